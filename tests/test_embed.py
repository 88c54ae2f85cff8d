"""EmbeddingCache against direct transformers computations on tiny local models, plus the bundled ones."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from mrm.embed import EmbeddingCache, minilm_path, smollm2_path  # noqa: E402

WORDS = (
    "the a is what how why good bad answer question explain say tell me about cats dogs weather "
    "today sunny rainy yes no maybe because it and of to in you i think sure here"
).split()
SPECIALS = ["[PAD]", "[UNK]", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<s>"]
CHAT_TEMPLATE = (
    "<s>{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
)

TEXTS = [
    ("what is the weather today", "sunny"),
    ("tell me about cats", "cats are good and you think dogs are bad because it is rainy today"),
    ("why", "maybe"),
    ("explain dogs", "sure here is the answer about dogs"),
    ("how good is it", "it is good"),
    ("what", "yes"),
    ("say no", "no no no"),
]
HISTORY = [
    {"role": "system", "content": "you are good"},
    {"role": "user", "content": "tell me about dogs"},
    {"role": "assistant", "content": "dogs are good"},
    {"role": "user", "content": "and cats"},
]


def word_level_tokenizer():
    """A small fast tokenizer built locally (no hub), with a chat template."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="<|end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[2:6]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_sizes(hidden_size):
    """The size both tiny backbones share: 2 layers of 4 heads, an MLP twice as wide."""
    return dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4)


def save_random(path, model_class, config, tokenizer, seed):
    """``model_class(config)`` with the random weights of ``seed`` (eval mode), saved to ``path``
    with ``tokenizer``."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def save_tiny_llama(path, hidden_size=16, seed=0):
    """A random 2-layer LlamaForCausalLM and its tokenizer, saved to ``path``."""
    tokenizer = word_level_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        **tiny_sizes(hidden_size),
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    return save_random(path, transformers.LlamaForCausalLM, config, tokenizer, seed), tokenizer


def save_tiny_bert(path, hidden_size=16, seed=1, normalize=False):
    """A random 2-layer BertModel with a local WordPiece vocab (optionally with ST's Normalize)."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(vocab), **tiny_sizes(hidden_size), max_position_embeddings=64)
    model = save_random(path, transformers.BertModel, config, tokenizer, seed)
    if normalize:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (path / "modules.json").write_text(json.dumps(modules))
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": hidden_size, "pooling_mode_mean_tokens": True})
        )
        (path / "2_Normalize").mkdir()
    return model, tokenizer


def causal_reference(model, tokenizer, prompt, response, max_length=None):
    """The paper's recipe computed directly: causal LM hidden_states[-1] at the last token, unpadded."""
    history = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages = history + [{"role": "assistant", "content": response}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if max_length is not None:
        ids = ids[-max_length:]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1].numpy()


def bert_reference(model, tokenizer, prompt, response, normalize=False):
    """Mean of the unpadded last hidden state (every token is real), optionally L2-normalised."""
    if prompt:
        features = tokenizer(prompt, response, return_tensors="pt")
    else:
        features = tokenizer(response, return_tensors="pt")
    with torch.no_grad():
        vector = model(**features).last_hidden_state[0].mean(dim=0).numpy()
    return vector / np.linalg.norm(vector) if normalize else vector


def module_rows(args, kwargs):
    if args:
        return args[0].shape[0]
    return kwargs["input_ids"].shape[0]


class CountRows:
    """Forward pre-hook (with kwargs) counting rows; raises once ``fail_after`` batches have run."""

    def __init__(self, module, fail_after=None):
        self.rows = 0
        self.batches = 0
        self.fail_after = fail_after
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if self.fail_after is not None and self.batches == self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.batches += 1
        self.rows += module_rows(args, kwargs)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = save_tiny_llama(path)
    return path, model, tokenizer


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_causal_last_token_matches_unpadded_reference(tmp_path, tiny_llama, padding_side):
    path, model, tokenizer = tiny_llama
    cache = EmbeddingCache(tmp_path / "cache", path, batch_size=3, padding_side=padding_side)
    assert cache.kind == "causal" and cache.pooling == "last-token"
    texts = TEXTS + [(HISTORY, "cats are good too")]
    embeddings = cache.embed(texts, progress=False)
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(texts), 16)
    expected = np.stack([causal_reference(model, tokenizer, p, r) for p, r in texts])
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)
    # A second instance reads everything from disk.
    again = EmbeddingCache(tmp_path / "cache", path)
    np.testing.assert_array_equal(again.embed(texts, progress=False), embeddings)
    assert again._model is None  # nothing to compute, the backbone was never loaded


def test_left_padding_with_absolute_positions(tmp_path):
    """GPT-2 adds learned position embeddings: left padding is right only if positions skip the pads."""
    tokenizer = word_level_tokenizer()
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=4, n_positions=128
    )
    torch.manual_seed(2)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    cache = EmbeddingCache(tmp_path / "cache", tmp_path / "gpt2", batch_size=4, padding_side="left")
    embeddings = cache.embed(TEXTS, progress=False)
    expected = np.stack([causal_reference(model, tokenizer, p, r) for p, r in TEXTS])
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)


def test_causal_truncation_keeps_the_last_tokens(tmp_path, tiny_llama):
    path, model, tokenizer = tiny_llama
    cache = EmbeddingCache(tmp_path, path, max_length=6, batch_size=4, padding_side="left")
    embeddings = cache.embed(TEXTS, progress=False)
    expected = np.stack([causal_reference(model, tokenizer, p, r, max_length=6) for p, r in TEXTS])
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)


def test_encoder_mean_pooling_matches_direct_computation(tmp_path):
    model, tokenizer = save_tiny_bert(tmp_path / "bert")
    cache = EmbeddingCache(tmp_path / "cache", tmp_path / "bert", batch_size=3)
    assert cache.kind == "encoder" and cache.pooling == "mean"
    texts = TEXTS + [("", "just the answer")]
    embeddings = cache.embed(texts, progress=False)
    expected = np.stack([bert_reference(model, tokenizer, p, r) for p, r in texts])
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)


def test_encoder_normalizes_when_modules_json_says_so(tmp_path):
    model, tokenizer = save_tiny_bert(tmp_path / "bert", normalize=True)
    cache = EmbeddingCache(tmp_path / "cache", tmp_path / "bert", batch_size=4)
    assert cache.pooling == "mean-normalized"
    embeddings = cache.embed(TEXTS, progress=False)
    expected = np.stack([bert_reference(model, tokenizer, p, r, normalize=True) for p, r in TEXTS])
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_duplicates_are_embedded_once(tmp_path, tiny_llama):
    path, model, tokenizer = tiny_llama
    cache = EmbeddingCache(tmp_path, path, batch_size=2)
    counter = CountRows(cache.model)
    texts = [TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[2], TEXTS[1], TEXTS[0]]
    embeddings = cache.embed(texts, progress=False)
    assert counter.rows == 3
    assert len(cache) == 3
    np.testing.assert_array_equal(embeddings[0], embeddings[2])
    np.testing.assert_array_equal(embeddings[0], embeddings[5])
    expected = causal_reference(model, tokenizer, *TEXTS[2])
    np.testing.assert_allclose(embeddings[3], expected, atol=1e-5, rtol=0)


def test_resume_after_crash_embeds_only_the_missing_texts(tmp_path, tiny_llama):
    path, model, tokenizer = tiny_llama
    texts = [(f"{a} {b}", f"{b} {c} {a}") for a, b, c in zip(WORDS, WORDS[3:], WORDS[7:])][:10]
    expected = np.stack([causal_reference(model, tokenizer, p, r) for p, r in texts])

    crashing = EmbeddingCache(tmp_path, path, batch_size=2, shard_rows=4)
    CountRows(crashing.model, fail_after=3)
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        crashing.embed(texts, progress=False)
    saved = len(EmbeddingCache(tmp_path, path))
    assert saved == 6  # the three finished batches were kept, the rest was not computed

    resumed = EmbeddingCache(tmp_path, path, batch_size=2, shard_rows=4)
    counter = CountRows(resumed.model)
    embeddings = resumed.embed(texts, progress=False)
    assert counter.rows == len(texts) - saved
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)
    counter.rows = 0
    np.testing.assert_array_equal(resumed.embed(texts[::-1], progress=False), embeddings[::-1])
    assert counter.rows == 0


def test_failed_shard_write_leaves_a_readable_cache(tmp_path, tiny_llama, monkeypatch):
    path, model, tokenizer = tiny_llama
    cache = EmbeddingCache(tmp_path, path, batch_size=2, shard_rows=2)
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync_then_die(fd):
        calls["n"] += 1
        if calls["n"] == 3:  # the manifest, one shard, then die half-way through the next shard
            raise OSError("disk vanished")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_then_die)
    with pytest.raises(OSError, match="disk vanished"):
        cache.embed(TEXTS, progress=False)
    monkeypatch.setattr(os, "fsync", real_fsync)

    shards = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert len(shards) == 1 and not shards[0].startswith(".")  # the half-written temp file is gone
    # A temporary file left by a killed process is ignored as well.
    (tmp_path / "shards" / ".00-dead.safetensors.tmp").write_bytes(b"half a shard")
    resumed = EmbeddingCache(tmp_path, path, batch_size=2)
    counter = CountRows(resumed.model)
    embeddings = resumed.embed(TEXTS, progress=False)
    assert counter.rows == len(TEXTS) - 2
    expected = np.stack([causal_reference(model, tokenizer, p, r) for p, r in TEXTS])
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)


def test_manifest_names_backbone_and_dimension(tmp_path, tiny_llama):
    path, _, _ = tiny_llama
    cache = EmbeddingCache(tmp_path, path)
    cache.embed(TEXTS[:2], progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["backbone_id"] == cache.backbone_id and manifest["dim"] == 16 == cache.dim
    assert manifest["backbone_id"].startswith(path.name)


def test_cache_of_another_backbone_is_refused(tmp_path, tiny_llama):
    path, _, _ = tiny_llama
    llama_cache = EmbeddingCache(tmp_path / "cache", path)
    llama_cache.embed(TEXTS[:2], progress=False)
    save_tiny_bert(tmp_path / "bert")
    with pytest.raises(ValueError) as error:
        EmbeddingCache(tmp_path / "cache", tmp_path / "bert")
    assert llama_cache.backbone_id in str(error.value) and "bert@" in str(error.value)


def test_cache_of_another_dimension_is_refused(tmp_path):
    save_tiny_llama(tmp_path / "narrow", hidden_size=16)
    save_tiny_llama(tmp_path / "wide", hidden_size=24)
    narrow = EmbeddingCache(tmp_path / "cache", tmp_path / "narrow", backbone_id="tiny")
    narrow.embed(TEXTS[:2], progress=False)
    wide = EmbeddingCache(tmp_path / "cache", tmp_path / "wide", backbone_id="tiny")
    with pytest.raises(ValueError, match=r"dim 16.*dim 24"):
        wide.embed(TEXTS[2:4], progress=False)


def test_missing_model_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        EmbeddingCache(tmp_path / "cache", missing)


def test_bad_texts_are_rejected(tmp_path, tiny_llama):
    path, _, _ = tiny_llama
    cache = EmbeddingCache(tmp_path, path)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        cache.embed([("a", "b"), "just a string"], progress=False)
    with pytest.raises(TypeError, match=r"texts\[0\]: prompt"):
        cache.embed([([{"role": "user"}], "b")], progress=False)


def test_import_does_not_need_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import mrm.embed as e\n"
        "try:\n"
        "    e._require_torch()\n"
        "except ImportError as err:\n"
        "    assert 'pip install mrm-fast[torch]' in str(err), err\n"
        "    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def test_minilm_matches_sentence_transformers(tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    path = minilm_path()
    reference_model = sentence_transformers.SentenceTransformer(str(path), device="cpu")
    responses = [
        "The cat sat on the mat.",
        "  Padding should not matter here at all, even for longer texts.  ",
        "ok",
    ]
    prompts = ["Where did the cat sit?", "Does padding matter?", "Say ok."]
    expected_single = reference_model.encode(responses, convert_to_numpy=True)
    pairs_in = [list(pair) for pair in zip(prompts, responses)]
    expected_pairs = reference_model.encode(pairs_in, convert_to_numpy=True)

    cache = EmbeddingCache(tmp_path, path, batch_size=2)
    assert cache.kind == "encoder" and cache.pooling == "mean-normalized" and cache.dim == 384
    single = cache.embed([("", r) for r in responses], progress=False)
    pairs = cache.embed(list(zip(prompts, responses)), progress=False)
    np.testing.assert_allclose(single, expected_single, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pairs, expected_pairs, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_smollm2_gguf_gives_finite_embeddings(tmp_path):
    pytest.importorskip("gguf")
    path = smollm2_path()
    assert path.suffix == ".gguf"
    texts = [
        ("What is 2 + 2?", "It is four."),
        ("Name a colour.", "Blue, like the clear sky on a summer afternoon."),
    ]
    cache = EmbeddingCache(tmp_path, path, batch_size=2, padding_side="left")
    embeddings = cache.embed(texts, progress=False)
    assert embeddings.shape == (2, 576) and np.isfinite(embeddings).all()
    # Batched (left-padded) rows equal each text run alone through the backbone.
    tokenizer = cache.tokenizer
    for row, (prompt, response) in enumerate(texts):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        ids = torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            alone = cache.model(input_ids=ids).last_hidden_state[0, -1].numpy()
        np.testing.assert_allclose(embeddings[row], alone, atol=1e-4, rtol=1e-4)
