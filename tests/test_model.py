"""Built-in tokenizer and tiny Llama (fastarcher/model.py): lossless word-level encoding, save/load round trip."""
import dataclasses
import random
import string

import pytest
import torch

from fastarcher.envs import ENV_NAMES, VOCAB_WORDS, EnvConfig, make_env
from fastarcher.envs.base import WORD_PATTERN
from fastarcher.model import (
    EOS_TOKEN,
    PAD_TOKEN,
    STOP_TEXT,
    UNK_TOKEN,
    ModelConfig,
    build_builtin_tokenizer,
    encode,
    encode_batch,
    load_policy,
    stop_token_id,
    transformer_blocks,
)

torch.manual_seed(0)


@pytest.fixture(scope="module")
def tok():
    return build_builtin_tokenizer()


def env_texts(name: str, episodes: int = 6) -> list[str]:
    """Prompts, random valid actions and observations of a few seeded episodes."""
    env, rng, texts = make_env(EnvConfig(name=name)), random.Random(0), []
    for seed in range(episodes):
        texts.append(env.reset(seed))
        done = False
        while not done:
            action = env.random_valid_action(rng)
            obs, _, done, _ = env.step(action)
            texts += [action, obs]
    return texts


@pytest.mark.parametrize("name", ENV_NAMES)
def test_env_texts_round_trip_with_one_token_per_word(tok, name):
    vocab = tok.get_vocab()
    for text in env_texts(name):
        ids = encode(tok, text)
        assert tok.decode(ids) == text
        # Every word (letter run, digit run) and every other character is exactly one known token.
        assert ids == [vocab[piece] for piece in WORD_PATTERN.findall(text)], text
        assert tok.unk_token_id not in ids


def test_encode_batch_equals_encode_of_each_text(tok):
    """The rollout encodes a turn's observations in one call: the same ids as one call per text (every env's
    texts, empty and whitespace-only strings, random printable strings, and a chat-template tokenizer)."""
    from test_chat import chat_tokenizer
    from fastarcher.chat import chat_format

    rng = random.Random(3)
    texts = [t for name in ENV_NAMES for t in env_texts(name, episodes=2)] + ["", " ", "\n\n", "\t x"]
    texts += ["".join(rng.choice(string.printable) for _ in range(rng.randint(0, 30))) for _ in range(50)]
    assert encode_batch(tok, texts) == [encode(tok, t) for t in texts]
    assert encode_batch(tok, []) == []
    chat = chat_tokenizer()
    fmt = chat_format(chat)
    wrapped = [fmt.first(t) for t in texts[:20]] + [fmt.next(t) for t in texts[:20]]
    assert encode_batch(chat, wrapped) == [encode(chat, t) for t in wrapped]


def test_arbitrary_printable_strings_round_trip(tok):
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n"
    texts = ["", " ", "\n\n", "  leading and trailing  ", "higherlower", "xhigher", "16.5", "007", "100101",
             "this is not an action!\n", "correct!correct", "Guess a number from 1 to 16.\n"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    texts += [" ".join(rng.choice(VOCAB_WORDS) for _ in range(rng.randint(1, 12))) for _ in range(100)]
    for text in texts:
        ids = encode(tok, text)
        assert tok.decode(ids) == text, (text, ids)
        assert tok.unk_token_id not in ids
    # Special-token texts map to the special ids and still decode to themselves.
    assert encode(tok, "<eos> <pad>") == [tok.eos_token_id, encode(tok, " ")[0], tok.pad_token_id]
    assert tok.decode(encode(tok, "<eos> <pad>")) == "<eos> <pad>"


def test_characters_outside_printable_ascii_become_one_unk_each(tok):
    # Documented limit of the built-in tokenizer: no byte fallback.
    ids = encode(tok, "a\u00e9b\u65e5\r")
    assert ids == [encode(tok, "a")[0], tok.unk_token_id, encode(tok, "b")[0], tok.unk_token_id, tok.unk_token_id]


def test_known_words_and_numbers_are_single_tokens(tok):
    for word in VOCAB_WORDS + tuple(str(n) for n in range(101)):
        ids = encode(tok, word)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == word, word


def test_known_word_inside_a_longer_run_is_split_into_characters(tok):
    # "higher" is a word, "highers" is not: the word rule never cuts a letter run in the middle.
    assert len(encode(tok, "higher")) == 1
    assert encode(tok, "highers") == [encode(tok, c)[0] for c in "highers"]
    assert encode(tok, "101") == [encode(tok, c)[0] for c in "101"]  # 0..100 only


def test_newline_is_the_single_stop_token(tok):
    stop = stop_token_id(tok)
    assert encode(tok, STOP_TEXT) == [stop]
    assert encode(tok, "\n\n") == [stop, stop]
    assert encode(tok, "higher\n")[-1] == stop
    assert stop not in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id)


def test_special_tokens_are_distinct_and_first(tok):
    assert tok.convert_ids_to_tokens([0, 1, 2]) == [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert encode(tok, "hi") == tok("hi", add_special_tokens=False)["input_ids"]


def test_tokenizer_is_deterministic_across_builds(tok):
    assert build_builtin_tokenizer().get_vocab() == tok.get_vocab()


def test_tokenizer_save_pretrained_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (
        tok.pad_token_id, tok.eos_token_id, tok.unk_token_id)
    for text in env_texts("twenty_questions", episodes=2) + ["x higher16 \t weird\n"]:
        assert encode(loaded, text) == encode(tok, text)
        assert loaded.decode(encode(loaded, text)) == text
    assert stop_token_id(loaded) == stop_token_id(tok)


def save_and_reload(model, tok, path):
    """The model and tokenizer saved to `path`, then loaded back through `--model.path`."""
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return load_policy(ModelConfig(path=str(path)))


def test_model_path_loads_a_saved_builtin_model_with_the_same_code(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=64)
    model, tok = load_policy(cfg)
    loaded, loaded_tok = save_and_reload(model, tok, tmp_path)
    ids = torch.tensor([encode(tok, "Guess a number from 1 to 16.\n8\nhigher\n")])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)
    assert loaded_tok.get_vocab() == tok.get_vocab()


def test_builtin_model_shapes_dtype_and_blocks():
    torch.manual_seed(0)
    model, tok = load_policy(ModelConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=48,
                                         max_positions=64, dtype="bfloat16"))
    assert len(transformer_blocks(model)) == 3
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied
    logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, len(tok))


def test_untied_builtin_model_has_its_own_output_matrix_and_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48, max_positions=64)
    tied, tok = load_policy(cfg)
    untied, _ = load_policy(dataclasses.replace(cfg, tie_embeddings=False))
    assert untied.get_input_embeddings().weight is not untied.get_output_embeddings().weight
    extra = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert extra == len(tok) * 32
    with torch.no_grad():
        untied.get_output_embeddings().weight.zero_()  # the output alone moves; the input embedding stays
    assert untied.get_input_embeddings().weight.abs().sum() > 0
    loaded, _ = save_and_reload(untied, tok, tmp_path)
    ids = torch.tensor([encode(tok, "Guess a number from 1 to 16.\n8\n")])
    with torch.no_grad():
        assert torch.equal(untied.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)
        assert loaded.eval()(input_ids=ids).logits.abs().max() == 0  # its zero output matrix came back


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=30, num_heads=4), r"model.hidden_size \(30\) must be divisible by model.num_heads \(4\)"),
    (dict(num_layers=0), r"model.num_layers \(0\) must be positive"),
    (dict(max_positions=-1), r"model.max_positions \(-1\) must be positive"),
])
def test_model_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)
