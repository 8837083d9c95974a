"""Where calibration runs: the dtype vLLM serves in, a decision stored ahead of time that the engine finds,
models too large for one device refused with the ways out, and --device auto (spread over GPUs)."""
import json

import pytest
import torch
from test_calibration import token_ids, tiny_model

from vllm_int4kv.policy import decide as auto
from vllm_int4kv.policy import calibration
from vllm_int4kv.policy import placement as calibration_device
from vllm_int4kv.policy.session import Session
from vllm_int4kv.policy.placement import (CalibrationOutOfMemory, PlacementError, auto_dtype_without_vllm,
                                            check_fits, serving_dtype, weight_bytes)
from vllm_int4kv.cli import main

FAST_ARGS = ["--prompts", "2", "--max-tokens", "96"]
WAYS_OUT = ("--device auto", "--device cpu", "VLLM_INT4KV_POLICY")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model folder saved in fp32, as many small checkpoints are (vLLM serves those in bf16)."""
    build_tiny_llama = pytest.importorskip("vllm_int4kv.testing.tiny_model").build_tiny_llama
    path = build_tiny_llama(tmp_path_factory.mktemp("device") / "tiny", seed=0)
    tiny_model().save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["dtype"] == "float32"
    return str(path)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """The engine's own settings (default prompts; the budget from an unset VLLM_INT4KV_KL_BUDGET)."""
    monkeypatch.setenv("VLLM_INT4KV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VLLM_INT4KV_KL_BUDGET", raising=False)


def config_with(dtype, model_type="llama"):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, dtype=dtype)


def vllm_answer(config):
    """What the installed vLLM resolves --dtype auto to for this config on this machine."""
    model_config = pytest.importorskip("vllm.config.model")
    return model_config._get_and_verify_dtype("unused", config, "auto", is_pooling_model=False)


CHECKPOINTS = [(t, d) for t in ("llama", "gemma2", "gemma3_text") for d in ("float32", "float16", "bfloat16")]


@pytest.mark.parametrize("model_type, stored", CHECKPOINTS)
def test_auto_dtype_is_vllms_own_answer(folder, model_type, stored):
    config = config_with(stored, model_type)
    expected = vllm_answer(config)
    assert serving_dtype("auto", config, model=folder) == expected
    assert auto_dtype_without_vllm(config) == expected  # the reading used where vLLM is not installed


def test_an_undeclared_dtype_is_read_from_the_weights_as_vllm_does(tmp_path):
    pytest.importorskip("vllm")
    from transformers import AutoConfig

    tiny_model().half().save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("dtype", None), raw.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = AutoConfig.from_pretrained(tmp_path)
    assert serving_dtype("auto", config, model=str(tmp_path)) == torch.float16  # vLLM read the weights
    assert auto_dtype_without_vllm(config) == torch.bfloat16  # the reading without vLLM cannot


@pytest.mark.parametrize("requested, served", [("float", torch.float32), ("half", torch.float16),
                                               ("bfloat16", torch.bfloat16), (torch.float16, torch.float16)])
def test_an_explicit_dtype_is_kept(requested, served):
    assert serving_dtype(requested, config_with("bfloat16")) == served


@pytest.mark.parametrize("stored, served", [("float32", torch.float16), ("bfloat16", torch.float16),
                                            ("float16", torch.float16)])
def test_gpus_before_ampere_serve_in_fp16(monkeypatch, stored, served):
    """vLLM lists no bf16 for compute capability < 8.0 (torch.cuda.is_bf16_supported() says True there:
    it counts emulation), so bf16 checkpoints are cast to fp16 too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert auto_dtype_without_vllm(config_with(stored)) == served
    assert calibration_device.device_type("auto") == "cuda"  # a spread model computes on the GPUs


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="unknown dtype 'int8': use one of auto, half, float16"):
        serving_dtype("int8")


def test_calibrate_default_dtype_computes_the_engines_key(folder):
    """`vllm serve` passes the dtype vLLM resolved (bf16 for this fp32 checkpoint); the command, left at
    --dtype auto, must compute the same key, or the engine calibrates a second time."""
    settings = auto.settings_from_env()
    prompts = calibration.load_prompts(settings)

    def key(dtype, device):
        head_dim, elem_bytes, served = auto.model_facts(folder, None, dtype, False)
        return auto.calibration_key(folder, settings, prompts, head_dim, elem_bytes, None, served, device)

    assert key("auto", "cuda") == key(torch.bfloat16, "cuda") == key(None, "cuda")
    assert key("auto", "cuda") != key(torch.float32, "cuda") != key(torch.float16, "cuda")
    assert key("auto", "cpu") == key(torch.bfloat16, "cpu")  # CPU computes in fp32 either way
    assert key(torch.float32, "cpu") != key(torch.bfloat16, "cpu")  # but 16-bit planes change size


@pytest.mark.parametrize("device", [None, "auto"])
def test_a_decision_stored_by_calibrate_is_found_at_engine_start(folder, device, capsys):
    """Default settings, as the engine uses them; the engine passes the dtype vLLM resolved (bf16)."""
    if device == "auto":
        pytest.importorskip("accelerate")
    assert main(["calibrate", folder] + ([] if device is None else ["--device", device])) == 0
    out = capsys.readouterr().out
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert "stored: " in out and f"VLLM_INT4KV_POLICY=auto finds it on {here} with --dtype bfloat16" in out
    decision = auto.decide("auto", auto.ModelTarget(folder, dtype=torch.bfloat16))
    assert decision.source == "cache"
    assert f"decision: {decision.policy.name}," in out


def test_a_decision_under_other_settings_says_the_engine_will_not_find_it(folder, capsys):
    assert main(["calibrate", folder, *FAST_ARGS]) == 0
    out = capsys.readouterr().out
    assert "finds it" not in out and "will not find this decision: set VLLM_INT4KV_POLICY=" in out


def test_weights_are_counted_without_loading(folder):
    model = tiny_model()
    params = sum(p.numel() for p in model.parameters())
    assert weight_bytes(model.config, torch.bfloat16) == 2 * params
    assert weight_bytes(model.config, torch.float32) == 4 * params
    quantized = model.config.__class__(quantization_config={"quant_method": "awq"})
    assert weight_bytes(quantized, torch.bfloat16) is None  # loads smaller than its parameter count


def test_a_model_larger_than_the_free_memory_is_refused_before_loading(folder):
    config = tiny_model().config
    need = weight_bytes(config, torch.bfloat16)
    check_fits(folder, config, torch.bfloat16, "cuda", free=need)  # fits exactly
    with pytest.raises(CalibrationOutOfMemory) as err:
        check_fits(folder, config, torch.bfloat16, "cuda:0", free=need - 1)
    message = str(err.value)
    assert "does not fit on cuda:0" in message and "GiB of weights in bfloat16" in message
    assert all(way in message for way in WAYS_OUT) and folder in message
    check_fits(folder, config, torch.float32, "cpu")  # no free-memory figure for CPU: nothing refused


def test_session_load_checks_the_free_memory_first(folder, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(calibration_device, "free_bytes", lambda device: 1024)
    loads = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a))
    with pytest.raises(CalibrationOutOfMemory, match=r"does not fit on cuda: .* GiB of weights in bfloat16"):
        Session.load(folder, token_ids(n=1, length=16), device="cuda")
    assert loads == []  # refused before loading anything


def test_free_memory_is_asked_of_the_gpu_named(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (123, 456))
    assert calibration_device.free_bytes("cuda:1") == 123 and asked == [torch.device("cuda:1")]
    assert calibration_device.free_bytes("cpu") is None and calibration_device.free_bytes("auto") is None


def test_spread_model_that_does_not_fit_is_not_told_to_spread():
    message = calibration_device.advice("m", "auto", "CUDA out of memory")
    assert "spread over every GPU" in message and "--device auto" not in message
    assert "--device cpu" in message and "VLLM_INT4KV_POLICY" in message


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")


def test_running_out_of_memory_while_loading_says_what_to_do(folder, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", out_of_memory)
    with pytest.raises(CalibrationOutOfMemory, match="Tried to allocate 2.00 GiB; at engine start-up"):
        auto.decide("auto", auto.ModelTarget(folder, dtype=torch.bfloat16))
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", folder, *FAST_ARGS])
    assert str(exit_.value).startswith("vllm-int4kv calibrate: vllm-int4kv: the auto-policy calibration")
    assert all(way in str(exit_.value) for way in WAYS_OUT)


def test_running_out_of_memory_in_a_forward_pass_says_what_to_do():
    model = tiny_model()
    with Session(model, token_ids(n=1, length=32)) as session:
        model.forward = out_of_memory
        with pytest.raises(CalibrationOutOfMemory, match="does not fit on cpu"):
            session.measure("k4v4", (4, 4, None, False))


def test_spreading_without_accelerate_says_to_install_it(folder, monkeypatch):
    real_find_spec = calibration_device.importlib.util.find_spec
    monkeypatch.setattr(calibration_device.importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a))
    with pytest.raises(PlacementError, match="pip install accelerate"):
        calibration_device.placement("auto")
    with pytest.raises(SystemExit, match="vllm-int4kv layers: .*pip install accelerate"):
        main(["layers", folder, *FAST_ARGS, "--device", "auto"])
