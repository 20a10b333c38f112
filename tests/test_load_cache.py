"""The GGUF load cache (`jlora.models.cache`): a cached load is the uncached one, bit for bit,
and a changed file, a damaged entry, a cache turned off or one that cannot be written all fall
back to reading the GGUF file."""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora.models
from jlora.models import cache

gguf = pytest.importorskip("gguf")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ is", "Ġ c", "a p", "Ġc ap"]
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = ["What is the capital of France?", " the cap is\tÜnïcode 123", "<|im_start|>user\nhi<|im_end|>"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def write_gguf(path: pathlib.Path, *, add_bos: bool = False, name: str | None = None) -> pathlib.Path:
    """A tiny Llama GGUF (2 layers, hidden 32, GQA) with a byte-level BPE tokenizer and a chat
    template; tensors in Q8_0, F16 and F32."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + list(bytes_to_unicode().values()) + ["".join(m.split()) for m in MERGES]
    hidden, ffn, heads, kv_heads, layers = 32, 64, 4, 2, 2
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    if name is not None:
        writer.add_name(name)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(TEMPLATE)

    def tensor(name: str, *shape: int, kind: str = "f32"):
        value = rng.standard_normal(shape).astype(np.float32) * 0.2
        if kind == "q8":
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(value, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, value.astype(np.float16) if kind == "f16" else value)

    tensor("token_embd.weight", len(tokens), hidden, kind="q8")
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden, kind="q8")
        tensor(f"blk.{i}.attn_k.weight", kv_heads * hidden // heads, hidden, kind="f16")
        tensor(f"blk.{i}.attn_v.weight", kv_heads * hidden // heads, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden, kind="q8")
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden, kind="q8")
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden, kind="f16")
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn, kind="q8")
    tensor("output_norm.weight", hidden)
    tensor("output.weight", len(tokens), hidden, kind="q8")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("JLORA_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def tiny(tmp_path):
    return write_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def reads(monkeypatch):
    """The GGUF files that `GGUFReader` opens from here on."""
    opened = []
    original = gguf.GGUFReader

    def reader(path, *args, **kwargs):
        opened.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", reader)
    return opened


def entries(folder: pathlib.Path) -> list[pathlib.Path]:
    """Every file and folder under the cache's gguf/ (temporary ones included)."""
    return sorted((folder / "gguf").iterdir()) if (folder / "gguf").exists() else []


def assert_same(a: jlora.models.Pretrained, b: jlora.models.Pretrained) -> None:
    assert a.config == b.config
    assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        assert isinstance(y, jax.Array) and x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit (no NaNs here)
    if a.tokenizer is None:
        assert b.tokenizer is None
        return
    ta, tb = a.tokenizer, b.tokenizer
    assert ta.chat_template == tb.chat_template
    assert ta.special_tokens_map == tb.special_tokens_map and len(ta) == len(tb)
    assert ta.add_bos_token == tb.add_bos_token and ta.add_eos_token == tb.add_eos_token
    for text in [*TEXTS, ta.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)]:
        assert ta(text)["input_ids"] == tb(text)["input_ids"], text
        assert ta.decode(ta(text)["input_ids"]) == tb.decode(tb(text)["input_ids"])
    assert ta.apply_chat_template(CHAT, add_generation_prompt=True) == tb.apply_chat_template(
        CHAT, add_generation_prompt=True
    )


@pytest.mark.parametrize("add_bos", [False, True])
def test_cached_load_is_the_uncached_load(tmp_path, cache_dir, reads, add_bos):
    path = write_gguf(tmp_path / "tiny.gguf", add_bos=add_bos)
    reference = jlora.models.load_gguf(path, cache=False)
    assert not cache_dir.exists() and len(reads) == 1
    cold = jlora.models.load_gguf(path)  # reads the file, writes the entry
    (entry,) = entries(cache_dir)
    assert {p.name for p in entry.iterdir()} == {"entry.json", "config.json", "tensors.safetensors", "tokenizer"}
    warm = jlora.models.load_gguf(path)  # reads the entry only
    assert len(reads) == 2
    assert_same(reference, cold)
    assert_same(reference, warm)
    assert warm.tokenizer.add_bos_token is add_bos
    assert warm.tokenizer("hi")["input_ids"][:1] == ([1] if add_bos else [warm.tokenizer.convert_tokens_to_ids("h")])
    # the entry holds the tensors before conversion: other layouts and dtypes load from it too
    for kwargs in ({"scan": True}, {"param_dtype": jnp.bfloat16}):
        assert_same(jlora.models.load_gguf(path, cache=False, **kwargs), jlora.models.load_gguf(path, **kwargs))
    assert len(reads) == 4 and entries(cache_dir) == [entry]


def test_a_changed_file_makes_a_new_entry(tiny, cache_dir, reads):
    jlora.models.load_gguf(tiny)
    (first,) = entries(cache_dir)
    stat = tiny.stat()
    os.utime(tiny, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched
    jlora.models.load_gguf(tiny)
    (second,) = entries(cache_dir)  # the old one is removed
    assert second != first and len(reads) == 2
    write_gguf(tiny, name="another size")
    os.utime(tiny, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same mtime, other size
    assert tiny.stat().st_size != stat.st_size
    changed = jlora.models.load_gguf(tiny)
    (third,) = entries(cache_dir)
    assert third not in (first, second) and len(reads) == 3
    assert_same(jlora.models.load_gguf(tiny, cache=False), changed)


@pytest.mark.parametrize(
    "damage",
    ["tensors.safetensors", "config.json", "entry.json", "tokenizer/tokenizer.json", "truncate", "garble", "names"],
)
def test_a_damaged_entry_is_ignored_and_rewritten(tiny, cache_dir, reads, damage):
    reference = jlora.models.load_gguf(tiny)
    (entry,) = entries(cache_dir)
    tensors = entry / "tensors.safetensors"
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:-100])
    elif damage == "garble":
        (entry / "config.json").write_text("{not json")
    elif damage == "names":  # a whole safetensors file, but not the tensors the manifest lists
        from safetensors.numpy import save_file

        save_file({"model.norm.weight": np.zeros(32, np.float32)}, tensors)
    else:
        (entry / damage).unlink()
    assert_same(reference, jlora.models.load_gguf(tiny))
    assert len(reads) == 2 and entries(cache_dir) == [entry]
    assert_same(reference, jlora.models.load_gguf(tiny))  # from the rewritten entry
    assert len(reads) == 2


def test_an_entry_without_tokenizer_serves_loads_without_one(tiny, cache_dir, reads):
    bare = jlora.models.load_gguf(tiny, tokenizer=False)
    assert bare.tokenizer is None and not (entries(cache_dir)[0] / "tokenizer").exists()
    assert_same(bare, jlora.models.load_gguf(tiny, tokenizer=False))
    assert len(reads) == 1
    full = jlora.models.load_gguf(tiny)  # the entry lacks the tokenizer: read again, rewritten with it
    assert full.tokenizer is not None and len(reads) == 2
    (entry,) = entries(cache_dir)
    assert (entry / "tokenizer" / "tokenizer.json").is_file()
    assert_same(full, jlora.models.load_gguf(tiny))
    assert_same(bare, jlora.models.load_gguf(tiny, tokenizer=False))
    assert len(reads) == 2


def test_a_concurrent_writer_keeps_the_entry_there(tiny, cache_dir):
    jlora.models.load_gguf(tiny)
    (entry,) = entries(cache_dir)
    before = (entry / "tensors.safetensors").stat().st_ino
    at = cache.entry(tiny)
    config, tensors, tokenizer = cache.read(at, tokenizer=True)
    # a second writer of the same entry loses the rename: its copy is dropped, the entry stays
    assert cache.write(at, config, {name: load() for name, load in tensors.items()}, tokenizer)
    assert entries(cache_dir) == [entry] and (entry / "tensors.safetensors").stat().st_ino == before


@pytest.mark.parametrize("how", ["env", "argument"])
def test_the_cache_turned_off_writes_nothing(tiny, tmp_path, monkeypatch, reads, how):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    if how == "env":
        monkeypatch.setenv("JLORA_CACHE_DIR", "off")
        assert cache.root() is None
    else:
        monkeypatch.delenv("JLORA_CACHE_DIR")
        assert cache.root() == home / ".cache" / "jlora"
    kwargs = {} if how == "env" else {"cache": False}
    jlora.models.load_gguf(tiny, **kwargs)
    jlora.models.load_gguf(tiny, **kwargs)
    assert len(reads) == 2 and not home.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_the_cache_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("JLORA_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.root() == tmp_path / ".cache" / "jlora"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.root() == tmp_path / "xdg" / "jlora"
    monkeypatch.setenv("JLORA_CACHE_DIR", str(tmp_path / "mine"))
    at = cache.entry(tiny)
    assert at.folder.parent == tmp_path / "mine" / "gguf" and at.folder.name.startswith("tiny-")
    assert cache.entry(tiny) == at  # the same file, the same entry


def test_an_unwritable_cache_still_loads_and_warns_once(tiny, tmp_path, monkeypatch, reads):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("JLORA_CACHE_DIR", str(blocker / "cache"))  # mkdir fails, also as root
    monkeypatch.setattr(cache, "_warned", False)
    with pytest.warns(UserWarning, match="cannot write the GGUF load cache"):
        loaded = jlora.models.load_gguf(tiny)
    assert_same(jlora.models.load_gguf(tiny, cache=False), loaded)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.models.load_gguf(tiny)  # no second warning
    assert len(reads) == 3


def test_smollm2_cached_load_is_the_uncached_load(reads):
    """The real preset (in the test session's cache folder, see conftest)."""
    try:
        path = jlora.models.locate("smollm2-135m-instruct")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    jlora.models.load(path, scan=True)  # makes the entry when this session's cache lacks it
    del reads[:]
    cached = jlora.models.load(path, scan=True)
    assert reads == []  # from the entry alone
    reference = jlora.models.load(path, scan=True, cache=False)
    assert_same(reference, cached)
    tok = cached.tokenizer
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok(prompt)["input_ids"] == reference.tokenizer(prompt)["input_ids"]
    assert tok.eos_token == "<|im_end|>"
