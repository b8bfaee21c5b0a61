"""Training an AdapterModel with the tools people already use — Hugging Face Trainer,
TRL's SFTTrainer and accelerate — with no special flags: the base's columns reach the
model, checkpoints hold only the adapters, resuming continues bit for bit, gradient
checkpointing works."""
from __future__ import annotations

import copy

import datasets
import pytest
import torch
import transformers
from conftest import make_model
from safetensors.torch import load_file

import polyadapter as pa


def classification_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, 12), generator=g)
    labels = (ids[:, 0] > 50).long()  # learnable from the first token
    return datasets.Dataset.from_dict({
        "input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist(),
        "text": [f"row {i}" for i in range(n)],  # a column the model does not take
    })


def bert_with_lora(seed=0):
    torch.manual_seed(seed)
    pm = pa.AdapterModel(make_model("bert", seed=seed))
    pm.add_adapter("task", pa.LoraConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]))
    pm.train_adapter("task")
    return pm


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=6,
                save_strategy="steps", save_steps=3, logging_steps=1, seed=0, report_to=[], use_cpu=True,
                dataloader_num_workers=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


def adapter_tensors(pm):
    return {k: v.detach().clone() for k, v in pm.adapter_state_dict("task").items()}


def test_trainer_trains_only_the_adapter_and_checkpoints_hold_only_it(tmp_path):
    pm = bert_with_lora()
    base_before = {k: v.clone() for k, v in pm.model.state_dict().items() if ".adapters." not in k}
    before = adapter_tensors(pm)
    trainer = transformers.Trainer(model=pm, args=args(tmp_path), train_dataset=classification_data())
    result = trainer.train()
    assert result.global_step == 6
    after = adapter_tensors(pm)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    base_after = {k: v for k, v in pm.model.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(v, base_after[k]) for k, v in base_before.items())  # the base did not move
    saved = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    assert saved and all(".adapters." in k for k in saved)  # only adapter tensors, no base weight
    n_base = sum(p.numel() for p in pm.model.parameters() if not p.requires_grad)
    assert sum(t.numel() for t in saved.values()) < n_base / 10
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_resume_from_checkpoint_is_bit_for_bit(tmp_path):
    full = bert_with_lora()
    transformers.Trainer(model=full, args=args(tmp_path / "a"), train_dataset=classification_data()).train()
    resumed = bert_with_lora()
    trainer = transformers.Trainer(model=resumed, args=args(tmp_path / "b"), train_dataset=classification_data())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    want, got = adapter_tensors(full), adapter_tensors(resumed)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_trainer_with_gradient_checkpointing_on_a_decoder(tmp_path):
    torch.manual_seed(0)
    pm = pa.AdapterModel(make_model("llama"))
    pm.add_adapter("task", pa.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    pm.train_adapter("task")
    ids = torch.randint(3, 100, (8, 10), generator=torch.Generator().manual_seed(1))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    before = adapter_tensors(pm)
    trainer = transformers.Trainer(model=pm, args=args(tmp_path, max_steps=2, save_strategy="no",
                                                        gradient_checkpointing=True), train_dataset=data)
    trainer.train()
    assert pm.model.is_activation_checkpointing
    after = adapter_tensors(pm)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("lora_A"))


def test_load_state_dict_is_all_or_nothing_and_never_touches_the_base():
    pm = bert_with_lora()
    state = {k: v.clone() for k, v in pm.state_dict().items()}
    assert state and all(".adapters." in k for k in state)
    with torch.no_grad():
        for p in pm.adapter_parameters("task").values():
            p.add_(1.0)
    pm.load_state_dict(state)
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in state.items())
    bad = dict(state)
    bad[next(iter(bad))] = torch.full_like(next(iter(bad.values())), float("nan"))
    before = {k: v.clone() for k, v in pm.model.state_dict().items()}
    with pytest.raises(pa.LoadError, match="NaN"):
        pm.load_state_dict(bad)
    with pytest.raises(pa.LoadError, match="unexpected"):
        pm.load_state_dict({**state, "model.bert.embeddings.word_embeddings.weight": torch.zeros(100, 32)})
    assert all(torch.equal(v, pm.model.state_dict()[k]) for k, v in before.items())


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(97)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def test_trl_sft_trainer(tmp_path):
    from trl import SFTConfig, SFTTrainer
    torch.manual_seed(0)
    pm = pa.AdapterModel(make_model("llama"))
    pm.add_adapter("chat", pa.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    pm.train_adapter("chat")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 97, (8,), generator=g)) for _ in range(16)]
    data = datasets.Dataset.from_dict({"text": texts})
    config = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                       report_to=[], use_cpu=True, save_strategy="steps", save_steps=3, max_length=16,
                       disable_tqdm=True, logging_steps=1)
    before = {k: v.clone() for k, v in pm.adapter_state_dict("chat").items()}
    trainer = SFTTrainer(model=pm, args=config, train_dataset=data, processing_class=tiny_tokenizer())
    trainer.train()
    after = pm.adapter_state_dict("chat")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    saved = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    assert saved and all(".adapters." in k for k in saved)


def test_accelerate_loop_and_state_hold_only_the_adapters(tmp_path):
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    pm = bert_with_lora()
    data = classification_data()
    loader = torch.utils.data.DataLoader(data.with_format("torch").remove_columns("text"), batch_size=4)
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-2)
    model, opt, loader = accelerator.prepare(pm, opt, loader)
    before = adapter_tensors(pm)
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    trained = adapter_tensors(pm)
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    accelerator.save_state(str(tmp_path / "state"))
    saved = load_file(str(tmp_path / "state" / "model.safetensors"))
    assert saved and all(".adapters." in k for k in saved)
    fresh = bert_with_lora()
    fresh.load_state_dict(saved)
    assert all(torch.equal(trained[k], v) for k, v in adapter_tensors(fresh).items())
    copy.deepcopy(pm)  # still an ordinary module


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_checkpoints_in_our_folder_formats_on_request(tmp_path, fmt):
    from polyadapter.integrations import SaveAdapterCallback
    pm = bert_with_lora()
    trainer = transformers.Trainer(model=pm, args=args(tmp_path), train_dataset=classification_data(),
                                   callbacks=[SaveAdapterCallback("task", format=fmt)])
    trainer.train()
    folder = tmp_path / "checkpoint-6" / "adapter"
    assert (folder / ("polyadapter.json" if fmt == "native" else "adapter_config.json")).is_file()
    again = pa.AdapterModel(make_model("bert", seed=0))
    again.load_adapter(folder, name="task")
    got = again.adapter_state_dict("task")
    assert all(torch.equal(v, got[k]) for k, v in pm.adapter_state_dict("task").items())
