"""Per-layer measurements (``calibration.PerLayer``) and ``vllm-int4kv layers``: which layers carry a
policy's error, and which ones to keep unquantized with ``--kv-cache-dtype-skip-layers``."""
from __future__ import annotations

import json

import pytest
import torch

from test_calibration import tiny_model, token_ids
from vllm_int4kv.policy import calibration
from vllm_int4kv.cli import layers as layers_cli
from vllm_int4kv.policy import sensitivity
from vllm_int4kv.policy.session import PerLayer, Session
from vllm_int4kv.policy import KVPolicy
from vllm_int4kv.policy.layer_map import PolicyMap

K4 = (4, 4, None, False)


def test_per_layer_specs_quantize_only_the_layers_they_name():
    with Session(tiny_model(), token_ids(n=1)) as session:
        whole = session.measure("k4v4", K4).kl
        assert session.measure("default", PerLayer(K4, {})).kl == whole
        assert session.measure("both named", PerLayer(None, {0: K4, 1: K4})).kl == whole
        assert session.measure("both kept", PerLayer(K4, {0: None, 1: None})).kl == 0.0
        alone = [session.measure(f"only {i}", PerLayer(None, {i: K4})).kl for i in (0, 1)]
        assert all(kl > 0 for kl in alone) and alone[0] != alone[1]


def test_a_layer_without_an_index_is_refused():
    model = tiny_model()
    del model.model.layers[0].self_attn.layer_idx
    with Session(tiny_model(), token_ids(n=1, length=16)) as reference_session:
        reference_session.measure("ok", PerLayer(None, {0: K4}))
    session = Session(model, token_ids(n=1, length=16))  # the full-precision pass needs no index
    with session, pytest.raises(NotImplementedError, match="has no layer_idx"):
        session.measure("per layer", PerLayer(None, {0: K4}))


def _fragile_second_layer():
    """Layer 0 ordinary; layer 1 with keys whose channel 3 is 14x the others (queries divided back) and
    an output 10x larger than the tiny model's damped one (without the outlier keys, the two layers
    then cost about the same KL at K4V4: 0.0045 each)."""
    model, plain = tiny_model(outlier_scale=14.0), tiny_model()
    model.model.layers[0].load_state_dict(plain.model.layers[0].state_dict())
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight *= 10.0
    return model


def test_sweep_keeps_the_worst_layer_first_and_measures_every_step():
    policy = KVPolicy(4, 4)
    with Session(_fragile_second_layer(), token_ids()) as session:
        tight = sensitivity.sweep(session, PolicyMap.uniform(policy), 64, 2, budget=1e-9, max_skip=2)
        assert tight.single[1] > 10 * tight.single[0] > 0
        # keeping both layers would be k16v16 served as int4_per_token_head: not a step
        assert [s.kept for s in tight.steps] == [[], [1]]
        assert tight.steps[0].kl > tight.steps[1].kl > 0.0
        assert [s.bytes_per_token for s in tight.steps] == [72, (72 + 256) / 2]
        assert tight.within_budget is None

        budget = tight.steps[1].kl * 1.01  # keeping layer 1 is enough, keeping nothing is not
        enough = sensitivity.sweep(session, PolicyMap.uniform(policy), 64, 2, budget=budget, max_skip=2)
    assert [s.kept for s in enough.steps] == [[], [1]] and enough.within_budget.kept == [1]
    text = layers_cli.report(enough, "MODEL")
    assert text.splitlines()[-1] == ("within budget: VLLM_INT4KV_POLICY='k4v4;1:k16v16' vllm serve MODEL "
                                     "--attention-backend CUSTOM")


def test_cli_reports_and_refuses_an_unquantized_policy(tiny_model_dir, tmp_path, capsys):
    from vllm_int4kv.cli import main

    out = tmp_path / "layers.json"
    assert main(["layers", str(tiny_model_dir), "--prompts", "1", "--max-tokens", "48", "--budget", "1e-9",
                 "--max-skip", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 attention layers, head_dim 64" in text and "no set of up to 1 unquantized layers" in text, text
    saved = json.loads(out.read_text())
    assert sorted(saved["single"]) == ["0", "1"] and len(saved["steps"]) == 2
    with pytest.raises(SystemExit, match="must quantize something"):
        main(["layers", str(tiny_model_dir), "--policy", "k16v16"])
    with pytest.raises(SystemExit):  # argparse: "needs a count of 0 or more"
        main(["layers", str(tiny_model_dir), "--max-skip", "-1"])
    assert "argument --max-skip: must be >= 0, got -1" in capsys.readouterr().err


def test_a_hybrid_model_is_swept_over_its_attention_layers_only(tmp_path):
    """Tiny Granite-4-style hybrid: layer 0 is Mamba-2 (no KV cache), layer 1 attention."""
    from vllm_int4kv.testing.tiny_model import build_tiny_hybrid

    model = build_tiny_hybrid(tmp_path / "hybrid")
    with Session.load(str(model), token_ids(n=1, length=32)) as session:
        assert session.attention_layers == [1]
        result = sensitivity.sweep(session, PolicyMap.uniform(KVPolicy(4, 4)), 64, 2, budget=1e-9, max_skip=3)
    assert list(result.single) == [1] and result.num_layers == 1
    # its only attention layer kept would be k16v16: the sweep measures the policy alone
    assert [s.kept for s in result.steps] == [[]] and result.steps[0].kl > 0.0
