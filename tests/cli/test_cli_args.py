"""Bad command-line input stops each subcommand with the reason and what to do, before any model loads or
engine starts: no traceback, no meaningless table."""
import json

import pytest
import torch

from vllm_int4kv.cli import args as cli_args
from vllm_int4kv import envs
from vllm_int4kv.cli import main

PLAN = ["plan", "--num-layers", "2", "--num-attention-heads", "4", "--num-kv-heads", "2", "--head-dim", "64"]


def error_of(argv, capsys) -> str:
    """The message a failing command leaves: SystemExit's text, or what argparse / plan printed."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    assert code not in (0, None), f"{argv} succeeded:\n{captured.out}"
    return (code if isinstance(code, str) else "") + captured.err + captured.out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    build_tiny_llama = pytest.importorskip("vllm_int4kv.testing.tiny_model").build_tiny_llama
    return str(build_tiny_llama(tmp_path_factory.mktemp("cli") / "tiny"))


@pytest.fixture
def files(tmp_path):
    (tmp_path / "text.txt").write_text("some text")
    (tmp_path / "garbage.json").write_bytes(b"\xa0\x00 not json")
    return tmp_path


@pytest.mark.parametrize("extra, message", [
    (["--kv-budget-gib", "1", "--context", "0"], "argument --context: must be >= 1, got 0"),
    (["--kv-budget-gib", "1", "--block-size", "0"], "argument --block-size: must be >= 1"),
    (["--kv-budget-gib", "inf"], "argument --kv-budget-gib: must be a finite number"),
    (["--kv-budget-gib", "-5"], "argument --kv-budget-gib: must be > 0, got -5"),
    (["--gpu-memory-gib", "80", "--gpu-memory-utilization", "90"], "must be in (0, 1]"),
    (["--kv-budget-gib", "1", "--weights-gib", "-10"], "argument --weights-gib: must be >= 0"),
    (["--kv-budget-gib", "1", "--bandwidth-gbs", "nan"], "argument --bandwidth-gbs: must be a finite number"),
    (["--kv-budget-gib", "1", "--batch", "x"], "argument --batch: not an integer: 'x'"),
    (["--kv-budget-gib", "1", "--plot", "kv.txt"], "give a file name ending in .png"),
    (["--kv-budget-gib", "1", "--plot", "/no/such/folder/kv.png"], "the folder /no/such/folder does not exist"),
    (["--kv-budget-gib", "1", "--policies", "auto"], "auto is decided per model"),
    (["--kv-budget-gib", "1", "--policies", ","], "give fixed policies"),
    (["--kv-budget-gib", "10", "--gpu-memory-gib", "80"], "give --kv-budget-gib or --gpu-memory-gib, not both"),
    (["--kv-budget-gib", "1", "--skip-layers", "01"], "vLLM ignores entries such as 01"),
    (["--kv-budget-gib", "1", "--skip-layers", "all"], "give layer indices as plain numbers"),
    (["--kv-budget-gib", "1", "--skip-layers", "1-0"], "the range 1-0 runs backwards; write 0-1"),
])
def test_plan_refuses_meaningless_values(extra, message, capsys):
    assert message in error_of(PLAN + extra, capsys)


def test_plan_names_kv_heads_that_do_not_divide_the_heads(capsys):
    argv = ["plan", "--num-layers", "2", "--num-attention-heads", "32", "--num-kv-heads", "12", "--head-dim",
            "128", "--kv-budget-gib", "1"]
    assert "12 KV heads must divide 32 attention heads" in error_of(argv, capsys)


def test_plan_names_a_config_that_is_not_json(files, capsys):
    message = error_of(["plan", "--model", str(files / "garbage.json"), "--kv-budget-gib", "1"], capsys)
    assert "garbage.json is not a JSON config" in message


def test_plan_sizes_an_fp32_checkpoint_as_vllm_serves_it(tmp_path, capsys):
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
              "hidden_size": 256, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--model", str(tmp_path), "--kv-budget-gib", "1"]) == 0
    assert "16-bit model dtype" in capsys.readouterr().out  # vLLM's --dtype auto serves fp32 in bf16
    assert main(["plan", "--model", str(tmp_path), "--kv-budget-gib", "1", "--dtype", "float32"]) == 0
    assert "32-bit model dtype" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["calibrate", "layers"])
@pytest.mark.parametrize("extra, message", [
    (["--budget", "0"], "argument --budget: must be > 0, got 0"),
    (["--budget", "nan"], "argument --budget: must be a finite number"),
    (["--margin", "0"], "argument --margin: must be > 0, got 0"),
    (["--margin", "1.5"], "the margin is a fraction of the budget, 0 < margin <= 1, got 1.5"),
    (["--prompts", "0"], "argument --prompts: must be >= 1"),
    (["--prompts", "1000"], "asked for 1000"),
    (["--max-tokens", "1"], "argument --max-tokens: must be >= 2"),
    (["--device", "gpu"], "'gpu': use cpu, cuda, cuda:N or auto"),
    (["--dtype", "fp16"], "invalid choice: 'fp16'"),
])
def test_calibration_commands_refuse_bad_settings(model_dir, command, extra, message, capsys, no_loading):
    assert message in error_of([command, model_dir, *extra], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_a_gpu_without_one_says_to_use_the_cpu(model_dir, capsys):
    assert "no CUDA GPU is visible here; use --device cpu" in error_of(["calibrate", model_dir, "--device",
                                                                        "cuda"], capsys)


def test_a_model_that_cannot_be_read_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "missing")
    message = error_of(["calibrate", missing], capsys)
    assert f"cannot read the config and tokenizer of {missing!r}" in message
    assert "Pass a local model folder holding config.json" in message
    assert f"{tmp_path} holds no config.json" in error_of(["calibrate", str(tmp_path)], capsys)


def test_a_model_with_code_of_its_own_is_told_about_trust_remote_code(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "custom_thing", "auto_map": {
        "AutoConfig": "configuration_custom.CustomConfig"}}))
    (tmp_path / "configuration_custom.py").write_text("from transformers import PretrainedConfig\n"
                                                      "class CustomConfig(PretrainedConfig):\n"
                                                      "    model_type = 'custom_thing'\n")
    assert "pass --trust-remote-code if you trust it" in error_of(["calibrate", str(tmp_path)], capsys)


class Loaded(Exception):
    """Raised in place of loading the model: a command that gets this far accepted its arguments."""


@pytest.fixture
def no_loading(monkeypatch):
    from vllm_int4kv.policy.session import Session

    def load(*args, **kwargs):
        raise Loaded
    monkeypatch.setattr(Session, "load", load)  # calibrate (through decide) and layers both load here


def test_outputs_are_checked_before_the_model_loads(model_dir, files, capsys, monkeypatch, no_loading):
    assert f"{files} is a folder: give a file name" in error_of(["calibrate", model_dir, "--json", str(files)],
                                                                capsys)
    monkeypatch.setenv("VLLM_INT4KV_CACHE_DIR", str(files / "text.txt"))  # a file, not a folder
    message = error_of(["calibrate", model_dir], capsys)
    assert "cannot store decisions in" in message and "or pass --no-cache" in message


@pytest.mark.parametrize("extra", [["--device", "CPU"], ["--json", "evidence.json"], ["--json", "~/e.json"],
                                   ["--dtype", "half"], ["--prompts", "2", "--max-tokens", "2", "--long-tokens", "0"]])
def test_calibrate_accepts_what_it_should(model_dir, extra, tmp_path, monkeypatch, no_loading):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(Loaded):
        main(["calibrate", model_dir, "--no-cache", *extra])


@pytest.mark.parametrize("extra", [
    ["--sliding-window", "8", "--sliding-layers", "even"], ["--sliding-window", "8", "--sliding-layers", "01"],
    ["--sliding-window", "8", "--skip-layers", "sliding_window"], ["--skip-layers", "0-1"],
    ["--sliding-window", "0"], ["--gen-tokens", "0"], ["--plot", "kv.svg"], ["--plot", "KV.PNG"]])
def test_plan_accepts_what_it_should(extra, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(PLAN + ["--kv-budget-gib", "1", *extra]) == 0, capsys.readouterr().out


def test_paths_come_back_usable(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "notes.md").write_text("notes")
    assert cli_args.input_file("~/notes.md") == str(tmp_path / "notes.md")  # a shell leaves --x=~/f alone
    assert cli_args.output_file("~/new.json") == str(tmp_path / "new.json")
    assert cli_args.output_folder(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")  # made later
    assert cli_args.above(0)("0.5") == 0.5 and cli_args.at_least(0)("0") == 0  # --limit, --ppl-chunks


def test_a_bad_budget_variable_is_named_even_beside_budget(model_dir, capsys, monkeypatch):
    """Deliberate: `vllm serve` fails on the same variable, so the command does not pass over it."""
    monkeypatch.setenv("VLLM_INT4KV_KL_BUDGET", "1%")
    assert "VLLM_INT4KV_KL_BUDGET='1%': give the auto policy's quality budget" in error_of(
        ["calibrate", model_dir, "--budget", "0.02"], capsys)
    monkeypatch.setenv("VLLM_INT4KV_KL_BUDGET", "")
    assert envs.kl_budget(0.01) == 0.01  # empty means unset


def test_an_empty_cache_dir_variable_means_the_default(monkeypatch):
    monkeypatch.setenv("VLLM_INT4KV_CACHE_DIR", "")
    assert envs.cache_dir().name == "vllm_int4kv"


def test_an_unsupported_head_size_stops_before_loading(tmp_path, capsys, no_loading):
    build_tiny_llama = pytest.importorskip("vllm_int4kv.testing.tiny_model").build_tiny_llama
    model = str(build_tiny_llama(tmp_path / "d40", head_dim=40))
    assert "head_dim 40 is not supported" in error_of(["calibrate", model], capsys)


@pytest.mark.parametrize("policy, message", [
    ("auto", "give a fixed one such as k4v4"), ("kx", "--policy: unknown KV policy"),
    ("k4v4-g64", "--policy: policy k4v4-g64: key groups of 64"), ("k16v16", "must quantize something")])
def test_layers_names_a_policy_it_cannot_sweep(model_dir, policy, message, capsys, no_loading):
    assert message in error_of(["layers", model_dir, "--policy", policy], capsys)


@pytest.mark.parametrize("extra, message", [
    (["--corpus", "missing.txt"], "argument --corpus: no such file: missing.txt"),
    (["--out", "{files}/text.txt"], "is a file: give a folder"),
    (["--timeout", "0"], "argument --timeout: must be > 0"),
    (["--gen-lengths", "64,abc"], "argument --gen-lengths: not an integer: 'abc'"),
    (["--top-k", "0"], "argument --top-k: must be >= 1"),
    (["--dtype", "fp16"], "invalid choice: 'fp16'"),
    (["--notes", "missing.md"], "argument --notes: no such file"),
    (["--out", "{files}/text.txt/sub"], "text.txt is a file, not a folder"),
    (["--ppl-chunks", "0", "--long-prompts", "0"], "nothing would be scored"),
])
def test_quality_refuses_bad_arguments_before_any_engine_starts(files, extra, message, capsys):
    argv = ["quality", "model", "--corpus", str(files / "text.txt"), "--out", str(files / "out")]
    argv += [part.format(files=files) for part in extra]
    assert message in error_of(argv, capsys)


@pytest.mark.parametrize("policy, message", [("k4v4-g64", "--policies: policy k4v4-g64: key groups of 64"),
                                             ("k4v4@skip=5", "k4v4@skip=5: the model's layers are 0 to 1")])
def test_quality_refuses_a_policy_the_model_cannot_take(model_dir, files, policy, message, capsys):
    from vllm_int4kv.quality import runner as quality

    argv = ["quality", model_dir, "--policies", policy, "--corpus", str(files / "text.txt"), "--out",
            str(files / "out")]
    assert message in error_of(argv, capsys)
    quality.check_policies(model_dir, ["k16v16", "k4v4-g32-rot", "k4v4@skip=1", "vllm:auto", "auto"])


def test_every_environment_variable_is_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    missing = [name for name in envs.ENV_VARS if f"`{name}`" not in readme]
    assert not missing, f"README's table lacks {missing}"
