"""`configs/*.yaml`: every ready config goes through `vllm-jd serve`'s own argument building
(`--config` expanded by vLLM's reader, `jd-*` keys as our options) and then vLLM's `serve`
parser, as `vllm-jd serve --config FILE` would run it, without starting an engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

from vllm_jd.envs import VLLM_JD_MAX_RESIDENT_CLUSTERS, VLLM_JD_SCHEDULER_POLICY
from vllm_jd.serving.serve import build_vllm_args, expand_config
from vllm_jd.serving.serve_options import JD_SCHEDULER_CLS, jd_environment, split_jd_options

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def _parse(argv: list[str]):
    """(vLLM's parsed serve arguments, our environment) for ``vllm-jd serve ARGV``."""
    vllm_argv, store = build_vllm_args(argv)
    assert vllm_argv[0] == "serve" and store is not None
    env = jd_environment(split_jd_options(expand_config(argv))[0])
    return make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_argv[1:]), env


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"cpu-demo.yaml", "mistral-7b-a100.yaml", "llama-3-8b-h100.yaml",
                                         "resident-budget.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_as_vllm_jd_serve_runs_it(config, serving_store):
    argv = ["--config", str(config), "--jd-store", str(serving_store)]  # the command line's store wins
    if "model:" not in config.read_text():
        argv = ["/models/any", *argv]
    args, env = _parse(argv)
    model = next((line.split(":", 1)[1].strip() for line in config.read_text().splitlines()
                  if line.startswith("model:")), "/models/any")
    assert args.model_tag == model and args.enable_lora and args.max_loras == args.max_num_seqs
    assert args.max_cpu_loras > 20  # every adapter of the store has an entry
    if config.name == "resident-budget.yaml":
        assert env[VLLM_JD_MAX_RESIDENT_CLUSTERS] == "8" and env[VLLM_JD_SCHEDULER_POLICY] == "cluster"
        assert args.scheduler_cls == JD_SCHEDULER_CLS and args.max_num_seqs == 128


def test_the_command_line_wins_over_the_config(serving_store):
    config = next(p for p in CONFIGS if p.name == "cpu-demo.yaml")
    args, _ = _parse(["--config", str(config), "--jd-store", str(serving_store), "--port", "9123"])
    assert args.port == 9123 and args.model_tag == "demo_out/model" and args.max_model_len == 512


def test_bad_configs_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="--config .*nothere.yaml: no such file"):
        expand_config(["--config", str(tmp_path / "nothere.yaml")])
    no_model = tmp_path / "no-model.yaml"
    no_model.write_text("port: 8000\n")
    with pytest.raises(ValueError, match="no model"):
        expand_config(["--config", str(no_model)])
    bad_value = tmp_path / "bad.yaml"
    bad_value.write_text("model: /m\njd-max-resident-clusters: 0\n")
    with pytest.raises(ValueError, match="--jd-max-resident-clusters '0': expected an integer ≥ 1"):
        jd_environment(split_jd_options(expand_config(["--config", str(bad_value)]))[0])
