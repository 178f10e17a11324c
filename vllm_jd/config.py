"""Configuration objects; every field documented, every bad value a ValueError naming it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

RECIPE_MAX_ERROR = 0.5
"""``compress --rank auto --clusters auto``'s target: the *mean* error over adapters. Measured on
the 96-adapter zoo (docs/quality.md): stores at mean error 0.21–0.48 kept 94–97% of the originals'
task accuracy, stores at 0.50–0.60 kept 80–86%. So 0.5 is where quality falls away; no mean target
keeps 99% there while saving parameters. Per-adapter quality is measured, not guessed: ``compress
--verify-model`` or ``vllm-jd verify --repair`` (``DEFAULT_THRESHOLD``)."""

DEFAULT_THRESHOLD = 0.95
"""``verify`` / ``compress --verify-model``: lowest greedy agreement with the original that passes
(1 token in 20 may differ). On the 96-adapter zoo (each adapter verified on 8 prompts of its own
task), repair at 0.95 left 91 of 96 adapters at ≥ 99% of their task accuracy (mean 99.8%); at 0.9,
55 (mean 94.2%) (docs/quality.md)."""

PLACE_MAX_ERROR = 0.1
"""``add`` and registration while serving: one new adapter is projected onto a cluster's basis only
if its own error is at most this; otherwise it is stored exactly (memory, never quality). On the
96-adapter zoo, adapters stored at error < 0.1 kept 99.2% of their own task accuracy on average
(62 cases), at 0.1–0.5 90–97%, the worst 21% (docs/quality.md). The paper's 0.5 was a mean over
many adapters, not a bound for one."""


class CompressConfig(BaseModel):
    """Settings of ``vllm-jd compress`` (and the projection in ``vllm-jd add``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["jd-full", "jd-diag", "svd", "compeft"] = Field(
        "jd-full", description="jd-full: orthonormal shared U, V and full r×r Σ_i; jd-diag: diagonal Σ_i; "
                               "svd: per-adapter truncated SVD (baseline, no sharing); compeft: every adapter "
                               "sparse-ternary coded on its own (ComPEFT, no sharing)")
    rank: int | None = Field(None, description="Rank r of U_c, V_c and Σ_i; None = auto (paper's recipe)")
    clusters: int | None = Field(None, description="Number of clusters; None = auto (smallest count, doubling, "
                                                   "whose mean error is below max_error)")
    max_error: float = Field(RECIPE_MAX_ERROR, description="Target mean relative reconstruction error for auto "
                                                          "settings (`add` uses PLACE_MAX_ERROR per adapter)")
    iters: int = Field(10, description="JD iterations per fit (paper default 10)")
    tol: float | None = Field(None, description="Stop a fit early when eq. 19's subspace change is below tol "
                                               "(paper: 1e-3)")
    seed: int = Field(0, description="Seed of the random initialisation and k-means")
    device: str = Field("cpu", description="torch device for the computation: cpu or cuda[:N]")
    max_rounds: int = Field(10, description="Cap on clustered-JD rounds (fit per cluster, then reassign)")
    density: float = Field(0.1, description="ComPEFT: fraction k of each adapter's parameters kept (paper grid "
                                            "0.05–0.5)")
    alpha: float = Field(1.0, description="ComPEFT: kept entries become ±alpha·std(adapter parameters) (paper: 1 "
                                          "for ≥13B models at k ≤ 0.2, else tuned on validation data)")
    compeft_encoding: Literal["golomb", "masks"] = Field(
        "golomb", description="ComPEFT bit coding: golomb (smallest, ~0.58 bits/param at k=0.1) or masks (2 bits/param)")
    basis_dtype: Literal["fp32", "bf16", "fp16", "int8"] = Field(
        "fp32", description="dtype U_c, V_c are stored in (int8: per-column scales); errors are measured after it")
    sigma_dtype: Literal["fp32", "bf16", "fp16", "int8"] = Field(
        "fp32", description="dtype Σ_i are stored in (int8: per-row scales); errors are measured after it")

    @field_validator("rank", "clusters")
    @classmethod
    def _positive_or_auto(cls, v: int | None, info) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"`{info.field_name}` must be a positive integer or auto, got {v}")
        return v

    @field_validator("max_error")
    @classmethod
    def _max_error(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"`max_error` must be > 0, got {v}")
        return v

    @field_validator("iters", "max_rounds")
    @classmethod
    def _non_negative(cls, v: int, info) -> int:
        if v < 0:
            raise ValueError(f"`{info.field_name}` must be ≥ 0, got {v}")
        return v

    @field_validator("tol")
    @classmethod
    def _tol(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"`tol` must be > 0, got {v}")
        return v

    @field_validator("density")
    @classmethod
    def _density(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"`density` {v} is not in (0, 1]; pass 0.05 for 5%")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not (v > 0 and v != float("inf")):
            raise ValueError(f"`alpha` must be a finite number > 0, got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v == "cpu" or v == "cuda" or v.startswith("cuda:")):
            raise ValueError(f"`device` must be cpu or cuda[:N], got {v!r}")
        return v
