"""``compress``: a collection of PEFT adapters → a store, one module at a time.

Steps: open every adapter (headers only) and validate; load the reference modules (the middle
layer's) and pick rank/clusters and the cluster of each adapter there; then for each module,
load its factors for all adapters, fit one basis per cluster, and write a shard. Peak memory is
one layer of factors, never the collection.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vllm_jd.compress import solvers
from vllm_jd.compress.factors import ModuleFactors, load_module, normalize, reconstruction_losses
from vllm_jd.compress.inputs import Input, gather
from vllm_jd.compress.peft_io import PeftAdapter, open_adapter, recorded_source
from vllm_jd.compress.project import place
from vllm_jd.compress.selection import choose, choose_svd_rank, load_references, one_cluster_cap, reference_modules
from vllm_jd.compress.summary import Summary, module_table
from vllm_jd.compress.svd import exact_diag
from vllm_jd.config import CompressConfig
from vllm_jd.sources.fetch import DEFAULT_WORKERS
from vllm_jd.store.dtypes import encode, roundtrip
from vllm_jd.store.errors import AdapterError
from vllm_jd.store.format import (
    AdapterInfo,
    ClusterInfo,
    Manifest,
    ModuleInfo,
    TensorReader,
    read_manifest,
    sigma_key,
    u_key,
    v_key,
)
from vllm_jd.store.transaction import check_writable, publish, writing
from vllm_jd.store.validate import check_store

logger = logging.getLogger(__name__)


def _opened(i: Input) -> PeftAdapter:
    a = open_adapter(i.name, i.folder)
    a.source = i.source
    return a


def compress(paths: list[str | Path], out: str | Path, config: CompressConfig, progress: bool = True,
             from_store: str | Path | None = None, recluster_exact: bool = False,
             fetch_workers: int = DEFAULT_WORKERS) -> Summary:
    """Compress the PEFT adapters of ``paths`` (folders, Hub ids or URLs: ``inputs.gather``) (and every adapter of ``from_store``) into a new
    store at ``out`` (atomic; ``out`` may be ``from_store`` itself: then whatever was added to or
    removed from it while this ran is carried over, so no acknowledged ``add`` is lost).

    The exact singletons of ``from_store`` stay exact (not refitted into a shared basis, where
    the auto settings only bound the *mean* error) unless ``recluster_exact``."""
    check_writable(out)  # before any download: a wrong --out must not cost one
    adapters = [_opened(i) for i in gather(paths, fetch_workers, progress)] if paths or from_store is None else []
    exact, merge = [], None
    if from_store is not None:
        from vllm_jd.compress.from_store import carry_over, store_adapters

        names = {a.name for a in adapters}
        snapshot = read_manifest(from_store)
        check_store(from_store, snapshot).set_aside(snapshot)  # never fit a basis to NaN
        for a in store_adapters(from_store, snapshot, progress=progress):
            if a.name in names:
                raise AdapterError(a.name, f"is both given and in --from-store {from_store}", a.path)
            kind = snapshot.clusters[snapshot.adapters[a.name].cluster].kind
            (exact if kind == "exact" and not recluster_exact and config.method != "compeft" else adapters).append(a)
        if Path(out).resolve() == Path(from_store).resolve():
            merge = carry_over(Path(from_store), snapshot, config.max_error)
    return compress_adapters(adapters, out, config, progress, exact=exact, merge=merge)


def compress_adapters(adapters: list[PeftAdapter], out: str | Path, config: CompressConfig,
                      progress: bool = True, exact: list | None = None, merge=None) -> Summary:
    """Compress opened adapters (anything with PeftAdapter's interface) into ``out``; ``exact``
    ones become exact singletons; ``merge`` is ``transaction.publish``'s."""
    exact = exact or []
    if config.method == "compeft":
        from vllm_jd.compress.compeft_store import compress_compeft

        return compress_compeft(adapters, out, config, progress, merge=merge)
    if not adapters:
        return _exact_only(exact, out, config, merge)
    t0 = time.perf_counter()
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: no CUDA device is available")
    modules = module_table(adapters)
    n = len(adapters)
    max_rank = _check_settings(config, modules, n)
    # the checksums read every file whole: on a thread beside the fits (hashlib releases the GIL)
    checksum_pool = ThreadPoolExecutor(1, thread_name_prefix="vllm-jd-checksum")
    checksums_later = checksum_pool.submit(lambda: [a.checksum() for a in adapters])
    checksum_pool.shutdown(wait=False)
    bases = {a.base_model for a in adapters}
    if len(bases) > 1:
        logger.warning("adapters name different base models: %s", sorted(map(str, bases)))
    ref_names = reference_modules(modules)
    choice, labels = _select(adapters, ref_names, config, max_rank, progress)
    t_select = time.perf_counter() - t0
    rank, k = choice.rank, int(labels.max()) + 1
    if config.method == "svd":  # a truncation above every adapter's own rank keeps nothing more
        rank = min(rank, max(s.rank for a in adapters for s in a.modules.values()))
    rows = torch.zeros(n, dtype=torch.long)
    for c in range(k):
        members = (labels == c).nonzero().squeeze(1)
        rows[members] = torch.arange(members.numel())
    sq_err = torch.full((n, len(modules)), float("nan"), dtype=torch.float64)
    sq_err_fp32 = sq_err.clone()  # the same before quantisation (equal for an fp32 store)
    weight = torch.zeros(n, len(modules), dtype=torch.float64)
    weight_map: dict[str, str] = {}
    with writing(out) as staging:
        tmp = staging.dir
        module_seconds, phases = _write_modules(adapters, modules, labels, rows, k, rank, config, staging,
                                                (sq_err, sq_err_fp32, weight), weight_map, progress)
        checksums = checksums_later.result()
        manifest = _manifest(adapters, config, modules, bases, ref_names, choice, labels, rows, rank, k,
                             (sq_err, sq_err_fp32, weight), checksums, weight_map)
        if exact:
            place(TensorReader(tmp, manifest), manifest, exact, tmp, config.max_error, force_exact=True)
        publish(staging, manifest, merge)
    return Summary(manifest, time.perf_counter() - t0, choice.tried, t_select, module_seconds, phases)


def _write_modules(adapters: list, modules: list, labels: torch.Tensor, rows: torch.Tensor, k: int, rank: int,
                   config: CompressConfig, staging, errors: tuple, weight_map: dict[str, str],
                   progress: bool) -> tuple[list[float], dict[str, float]]:
    """Fit and write every module, one shard each, into ``staging``; fills ``errors`` (squared
    errors as stored, before the store's dtypes, weights) and ``weight_map``. Returns the seconds
    per module and per phase (read, fit, write)."""
    sq_err, sq_err_fp32, weight = errors
    per_fit = max(config.iters, 1)
    fits = sum(len({int(labels[i]) for i, a in enumerate(adapters) if m.name in a.modules}) for m in modules)
    if config.method == "svd":
        fits = len(modules)
    bar = tqdm(total=fits * per_fit, desc="compress", unit="it", disable=not progress)
    phases = {"read": 0.0, "fit": 0.0, "write": 0.0}
    module_seconds: list[float] = []
    for mi, module in enumerate(modules):
        t_module = time.perf_counter()
        bar.set_postfix_str(module.name, refresh=False)
        f, present = load_module(adapters, module.name, config.device)  # read once, used by both
        t_read = time.perf_counter()
        tensors = _compress_module(f, present, module, labels, rows, k, rank, config, mi, sq_err, weight, bar)
        sq_err_fp32[:, mi] = sq_err[:, mi]
        t_fit = time.perf_counter()
        tensors = _store_dtypes(tensors, f, present, module, labels, rows, config, mi, sq_err)
        shard = staging.shard(f"m{mi:05d}")
        save_file(tensors, str(staging.dir / shard))
        weight_map.update({key: shard for key in tensors})
        module_seconds.append(time.perf_counter() - t_module)
        phases["read"] += t_read - t_module
        phases["fit"] += t_fit - t_read
        phases["write"] += time.perf_counter() - t_fit
    bar.close()
    return module_seconds, phases


def _check_settings(config: CompressConfig, modules: list, n: int) -> int:
    """ValueError naming a setting these ``n`` adapters' ``modules`` cannot take; returns the
    largest rank any module takes."""
    max_rank = min(min(m.d_in, m.d_out) for m in modules)
    if config.rank is not None and config.rank > max_rank:
        # refused, not clamped per module: a clamped module would be padded back to the store's
        # rank for serving (zeros held for every cluster) and the store would not be what was asked
        small = min(modules, key=lambda m: min(m.d_in, m.d_out))
        raise ValueError(f"rank {config.rank} is larger than module {small.name} ({small.d_in}→{small.d_out}); use "
                         f"--rank {max_rank} or less (at {max_rank} that module is stored exactly), or --rank auto")
    if config.method == "svd" and config.clusters not in (None, n):
        raise ValueError("--clusters does not apply to --method svd (every adapter has its own basis)")
    if config.clusters is not None and config.clusters > n:
        raise ValueError(f"clusters {config.clusters} is more than the {n} adapters")
    return max_rank


def _select(adapters: list, ref_names: list[str], config: CompressConfig, max_rank: int, progress: bool):
    """Rank and clusters (``selection.choose``, or the SVD rank) from the reference modules:
    (the choice, each adapter's cluster label)."""
    n = len(adapters)
    fixed = config.method != "svd" and config.rank is not None and config.clusters == 1  # nothing to choose
    refs = [] if fixed else load_references(adapters, ref_names, config.device)
    if config.method == "svd":
        return choose_svd_rank(refs, n, config, max_rank), torch.arange(n)
    with tqdm(desc="clusters", unit="it", disable=not progress) as sel_bar:
        choice = choose(config.method, refs, n, config.rank, config.clusters, config.max_error, max_rank,
                        config.iters, config.tol, config.seed, config.max_rounds, on_iter=lambda: sel_bar.update(1),
                        one_cluster_max=one_cluster_cap(config.method, adapters))
    return choice, choice.clustering.labels


def _manifest(adapters: list, config: CompressConfig, modules: list, bases: set, ref_names: list[str], choice,
              labels: torch.Tensor, rows: torch.Tensor, rank: int, k: int, errors: tuple, checksums: list[str],
              weight_map: dict[str, str]) -> Manifest:
    """The new store's manifest. errors: per adapter and module, the squared relative errors as
    stored and before the store's dtypes, and the weights (‖P‖²) that aggregate them."""
    sq_err, sq_err_fp32, weight = errors
    agg = ((torch.nan_to_num(sq_err) * weight).sum(1) / weight.sum(1).clamp_min(1e-300)).sqrt()
    agg32 = ((torch.nan_to_num(sq_err_fp32) * weight).sum(1) / weight.sum(1).clamp_min(1e-300)).sqrt()
    quantised = (config.basis_dtype, config.sigma_dtype) != ("fp32", "fp32")
    kind = "svd" if config.method == "svd" else "shared"
    return Manifest(
        method=config.method, sigma="full" if config.method == "jd-full" else "diag", rank=rank,
        basis_dtype=config.basis_dtype, sigma_dtype=config.sigma_dtype,
        base_model=next(iter(bases)) if len(bases) == 1 else None,
        settings={**config.model_dump(), "rank_chosen": rank, "clusters_chosen": k,
                  "reference_modules": ref_names, "auto_tried": choice.tried},
        modules=modules,
        clusters=[ClusterInfo(id=c, rank=rank, kind=kind) for c in range(k)],
        adapters={a.name: AdapterInfo(
            cluster=int(labels[i]), block=0, row=int(rows[i]), rank=max(s.rank for s in a.modules.values()),
            lora_params=a.lora_params, checksum=checksums[i], source=recorded_source(a), error=float(agg[i]),
            error_fp32=float(agg32[i]) if quantised else None,
            module_errors=[None if e != e else round(float(e) ** 0.5, 6) for e in sq_err[i].tolist()])
            for i, a in enumerate(adapters)},
        weight_map=weight_map)


def _exact_only(exact: list, out: str | Path, config: CompressConfig, merge) -> Summary:
    """A store of exact singletons only (``--from-store`` of a store that holds nothing else)."""
    if not exact:
        raise ValueError("no adapters given: pass at least one PEFT adapter folder")
    t0 = time.perf_counter()
    modules = module_table(exact)
    rank = max(s.rank for a in exact for s in a.modules.values())
    manifest = Manifest(method=config.method, sigma="full" if config.method == "jd-full" else "diag", rank=rank,
                        basis_dtype=config.basis_dtype, sigma_dtype=config.sigma_dtype,
                        settings={**config.model_dump(), "rank_chosen": rank, "clusters_chosen": 0},
                        modules=modules, clusters=[], adapters={})
    with writing(out) as staging:
        place(TensorReader(staging.dir, manifest), manifest, exact, staging.dir, config.max_error, force_exact=True)
        publish(staging, manifest, merge)
    return Summary(manifest, time.perf_counter() - t0, [])


def _compress_module(f: ModuleFactors, present: torch.Tensor, module: ModuleInfo, labels, rows, k, rank, config, mi,
                     sq_err, weight, bar) -> dict:
    """Fit every cluster's basis for one module (factors ``f`` of the adapters ``present``);
    fill errors; return the shard's tensors."""
    fn, norms = normalize(f)
    norms = norms.cpu()
    weight[present, mi] = norms**2
    tensors: dict[str, torch.Tensor] = {}
    if config.method == "svd":
        U, s, V = exact_diag(f)  # all r_max singular triplets, descending
        loss = (s[:, rank:].double().cpu() ** 2).sum(1)  # Eckart–Young: the discarded energy
        sq_err[present, mi] = torch.where(norms > 0, loss / norms.clamp_min(1e-300) ** 2, torch.zeros_like(loss))
        U, s, V = (_pad_cols(t[..., :rank], rank) for t in (U, s, V))
        for j, i in enumerate(present.tolist()):
            tensors[u_key(i, module.name)] = U[j].cpu().contiguous()
            tensors[v_key(i, module.name)] = V[j].cpu().contiguous()
            tensors[sigma_key(i, 0, module.name)] = s[j : j + 1].cpu().contiguous()
        bar.update(max(config.iters, 1))
        return tensors
    lab = labels[present]
    clusters_here = [c for c in range(k) if bool((lab == c).any())]
    for c in clusters_here:
        local = (lab == c).nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + mi * 1009 + c)
        res = solvers.fit(config.method, fn.subset(local.to(fn.A.device)), rank, config.iters, config.tol, gen,
                          on_iter=lambda: bar.update(1))
        bar.update(max(config.iters, 1) - (len(res.losses) - 1))  # iterations skipped by --tol, or the 0-iter fit
        sub = fn.subset(local.to(fn.A.device))
        loss = solvers.final_losses(config.method, sub, res.U, res.V, res.sigma).cpu()
        members = present[local]
        sq_err[members, mi] = torch.where(norms[local] > 0, loss, torch.zeros_like(loss))
        n_c = int((labels == c).sum())
        sigma = torch.zeros((n_c,) + tuple(res.sigma.shape[1:]), dtype=torch.float32)
        restore = norms[local].to(torch.float32).view(-1, *([1] * (res.sigma.dim() - 1)))
        sigma[rows[members]] = res.sigma.cpu() * restore  # undo the unit-norm scaling (§2.7)
        tensors[u_key(c, module.name)] = res.U.cpu().contiguous()
        tensors[v_key(c, module.name)] = res.V.cpu().contiguous()
        tensors[sigma_key(c, 0, module.name)] = sigma
    return tensors


def _store_dtypes(tensors: dict, f: ModuleFactors, present: torch.Tensor, module: ModuleInfo, labels, rows, config,
                  mi, sq_err) -> dict:
    """Encode one module's tensors in the configured store dtypes; re-measure the errors.

    The errors recorded are those of what a reader gets back, so ``inspect`` and ``export``
    agree with what is served. An fp32 store is returned unchanged.
    """
    if (config.basis_dtype, config.sigma_dtype) == ("fp32", "fp32"):
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key, x in tensors.items():
        kind = "sigma" if key.startswith("sigma.") else "basis"
        out.update(encode(key, x, config.basis_dtype if kind == "basis" else config.sigma_dtype, kind))
    f = ModuleFactors(f.A.cpu(), f.Bt.cpu())  # the stored tensors are on the CPU
    norms = f.norms()
    cluster_of = labels[present]
    for c in cluster_of.unique().tolist():
        local = (cluster_of == c).nonzero().squeeze(1)
        U = roundtrip(tensors[u_key(c, module.name)], config.basis_dtype, "basis")
        V = roundtrip(tensors[v_key(c, module.name)], config.basis_dtype, "basis")
        sig = roundtrip(tensors[sigma_key(c, 0, module.name)], config.sigma_dtype, "sigma")
        members = present[local]
        loss = reconstruction_losses(f.subset(local), U, V, sig[rows[members]])
        nrm2 = norms[local].double() ** 2
        sq_err[members, mi] = torch.where(nrm2 > 0, loss / nrm2.clamp_min(1e-300), torch.zeros_like(loss))
    return out


def _pad_cols(t: torch.Tensor, rank: int) -> torch.Tensor:
    """Zero-pad the last dim of t to ``rank`` (a module whose adapters have lower rank)."""
    if t.shape[-1] == rank:
        return t
    return torch.nn.functional.pad(t, (0, rank - t.shape[-1]))
