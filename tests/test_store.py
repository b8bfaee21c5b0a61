"""The adapter store (polyadapter.store and ``polyadapter store ...``): versions, aliases,
tags, search, lineage, import/export, compatibility, names, integrity and schema
migration, on tiny models, real SQLite and real files."""
from __future__ import annotations

import json
import os
import sqlite3

import pytest
import torch
from conftest import make_inputs, make_model, output_of

import polyadapter as pa
from polyadapter.cli import main
from polyadapter.ops.combine import combine
from polyadapter.store import (
    IntegrityError,
    InUseError,
    InvalidNameError,
    NotFoundError,
    Ref,
    SchemaError,
    Store,
    StoreError,
    StoreNotFoundError,
    blobs,
    default_store_path,
    is_store_ref,
    parse_ref,
    schema,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def trained(kind="bert", name="a", seed=0, config=None, provenance=None):
    """An AdapterModel with one LoRA adapter whose weights are random (so outputs differ)."""
    pm = pa.AdapterModel(make_model(kind))
    pm.add_adapter(name, config or pa.LoraConfig(r=4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_parameters(name).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.record(name).provenance.update(provenance or {})
    return pm


def fresh(kind="bert"):
    return pa.AdapterModel(make_model(kind))


@pytest.fixture
def store(tmp_path):
    s = Store.init(tmp_path / "store")
    yield s
    s.close()


def blob_count(store) -> int:
    return len(blobs.blob_files(store.path))


# ---------------------------------------------------------------------- add, versions, aliases, load
def test_add_folder_versions_aliases_and_load_gives_the_same_outputs(store, tmp_path):
    pm = trained(seed=1)
    pm.save_adapter("a", tmp_path / "a1")
    pm2 = trained(seed=2)
    pm2.save_adapter("a", tmp_path / "a2")
    v1 = store.add(tmp_path / "a1", name="topic", tags=["news"], alias="prod", description="BBC topics")
    v2 = store.add(tmp_path / "a2", name="topic")
    assert (v1.ref, v2.ref) == ("topic@1", "topic@2")
    assert store.resolve("topic").ref == "topic@2"                   # NAME alone: the newest
    assert store.resolve("store:topic@prod").ref == "topic@1"
    assert store.resolve(Ref("topic", version=1)).aliases == ["prod"]

    x = make_inputs("bert")
    for ref, src in (("topic@prod", pm), ("topic", pm2)):
        target = fresh()
        record = store.load_into(target, ref)
        assert record.name == "topic" and target.active_adapters == ("topic",)
        torch.testing.assert_close(output_of(target, x), output_of(src, x), rtol=0, atol=0)
        assert record.provenance["store"]["name"] == "topic"
    other = fresh()
    store.load_into(other, "topic@1", name="t1", activate=False)
    assert other.adapters == ["t1"] and other.active_adapters == ()

    moved = store.set_alias("topic@2", "prod")                        # an alias moves
    assert moved.ref == "topic@2" and store.resolve("topic@prod").ref == "topic@2"
    store.remove_alias("topic", "prod")
    with pytest.raises(NotFoundError, match="no alias 'prod'.*versions: 1, 2"):
        store.resolve("topic@prod")
    with pytest.raises(NotFoundError, match="no adapter 'nope'"):
        store.resolve("nope")


def test_identical_adapters_share_one_blob_and_bytes_are_deterministic(store, tmp_path):
    pm = trained()
    pm.save_adapter("a", tmp_path / "a")
    v1 = store.add(tmp_path / "a", name="x")
    v2 = store.add_from_model(pm, "a", "y")                           # same tensors, another path
    state = pm.adapter_state_dict("a")
    shuffled = {k: state[k].t().contiguous().t() for k in reversed(list(state))}  # other order, other strides
    assert blobs.tensors_to_bytes(shuffled) == blobs.tensors_to_bytes(state)
    assert v1.blob == v2.blob and blob_count(store) == 1
    assert store.blob_users(v1.blob) == ["x@1", "y@1"]
    # the folder's file is stored as it is only when it is exactly the canonical bytes
    weights = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    assert blobs.is_canonical(weights) and weights == blobs.tensors_to_bytes(state)
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "a" / "adapter.safetensors"), metadata={"format": "pt"})  # another writer
    assert not blobs.is_canonical((tmp_path / "a" / "adapter.safetensors").read_bytes())
    assert store.add(tmp_path / "a", name="z").blob == v1.blob and blob_count(store) == 1
    from safetensors.torch import save
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool):
        mixed = {"w": torch.randn(3, 5, generator=g).t(), "scalar": torch.tensor(2.0), "empty": torch.zeros(0, 4),
                 "b.z": torch.randn(7, generator=g)}
        mixed = {k: v.to(dtype) for k, v in mixed.items()}
        assert blobs.tensors_to_bytes(mixed) == save({k: v.contiguous() for k, v in mixed.items()}), dtype
    two = {"a": torch.ones(2), "b": torch.ones(2, dtype=torch.float16)}   # two dtypes: safetensors itself
    assert blobs.tensors_to_bytes(two) == save(two)
    half = {k: v.half() for k, v in state.items()}
    assert not blobs.is_canonical(b"\x00" * 8) and blobs.is_canonical(blobs.tensors_to_bytes(half))


def test_peft_folder_is_added_as_the_native_form(store, tmp_path):
    pm = trained("llama")
    pm.save_adapter("a", tmp_path / "peft", format="peft")
    v = store.add(tmp_path / "peft", name="fromPeft")
    assert v.method == "lora" and v.provenance.get("source_format") == "peft"
    a, b = fresh("llama"), fresh("llama")
    a.load_adapter(tmp_path / "peft", name="p")
    store.load_into(b, "fromPeft")
    x = make_inputs("llama")
    torch.testing.assert_close(output_of(b, x), output_of(a, x), rtol=0, atol=0)


def test_packed_compeft_adapter_stays_packed_and_loads(store, tmp_path):
    from polyadapter.ops.compress import compeft
    pm = trained()
    compeft(pm, "a", "c", density=0.2)
    v = store.add_from_model(pm, "c", "packed")
    assert v.meta["packing"] and v.size < len(blobs.tensors_to_bytes(pm.adapter_state_dict("c")))
    target = fresh()
    store.load_into(target, "packed")
    x = make_inputs("bert")
    pm.set_active("c")
    torch.testing.assert_close(output_of(target, x), output_of(pm, x), rtol=0, atol=0)
    store.export("packed", tmp_path / "exp")
    again = fresh()
    again.load_adapter(tmp_path / "exp")
    torch.testing.assert_close(output_of(again, x), output_of(pm, x), rtol=0, atol=0)


# ---------------------------------------------------------------------- lineage and removal
def test_lineage_from_store_loaded_sources_and_rm_refusal(store, tmp_path):
    a, b = trained(seed=1), trained(seed=2)
    store.add_from_model(a, "a", "src-a")
    store.add_from_model(b, "a", "src-b")
    pm = fresh()
    store.load_into(pm, "src-a")
    store.load_into(pm, "src-b")
    combine(pm, "ab", ["src-a", "src-b"], [1, 1], method="linear")
    ab = store.add_from_model(pm, "ab", tags=["merged"])
    tree = store.lineage("ab")
    assert [(p["ref"], p["role"]) for p in tree["parents"]] == [("src-a@1", "source"), ("src-b@1", "source")]
    assert "store" not in ab.provenance                               # stripped: lineage records it
    assert store.lineage("src-a")["children"] == ["ab@1"]

    # a second generation: the tree goes deeper
    store.load_into(pm, "ab", name="ab2")
    combine(pm, "abc", ["ab2", "src-a"], [1, 1], method="linear")
    store.add_from_model(pm, "abc")
    deep = store.show("abc")["lineage"]
    assert [p["ref"] for p in deep["parents"]] == ["ab@1", "src-a@1"]
    assert [p["ref"] for p in deep["parents"][0]["parents"]] == ["src-a@1", "src-b@1"]

    with pytest.raises(InUseError, match=r"ab@1 \(from src-a@1\)"):
        store.remove("src-a")
    with pytest.raises(InUseError, match=r"abc@1"):
        store.remove("ab@1")
    assert store.remove("abc") == ["abc@1"]
    assert store.remove("ab") == ["ab@1"]
    assert store.remove("src-a@1") == ["src-a@1"]
    assert store.verify().ok


def test_rm_all_versions_numbers_never_reused_and_gc(store, tmp_path):
    for seed in range(3):
        store.add_from_model(trained(seed=seed), "a", "x")
    with pytest.raises(StoreError, match="has 3 versions"):
        store.remove("x")
    assert store.remove("x@3") == ["x@3"]
    assert store.add_from_model(trained(seed=7), "a", "x").ref == "x@4"   # 3 is never reused
    assert store.remove("x", all_versions=True) == ["x@1", "x@2", "x@4"]
    assert store.list() == [] and blob_count(store) == 4
    stale = store.path / blobs.TMP / "999999999-dead.part"               # a temp file of a dead writer
    stale.write_bytes(b"partial")
    live = store.path / blobs.TMP / f"{os.getpid()}-live.part"           # one being written right now
    live.write_bytes(b"partial")
    report = store.gc()
    assert (report.blobs_removed, report.temp_files_removed) == (4, 1) and report.bytes_freed > 0
    assert blob_count(store) == 0 and not stale.exists() and live.exists()


# ---------------------------------------------------------------------- list, search, compatibility
def test_list_filters_and_search(store, tmp_path):
    store.add_from_model(trained(provenance={"data": "bbc", "metrics": {"test_accuracy": 0.91}}), "a", "news",
                         tags=["topic"], description="five BBC News topics")
    store.add_from_model(trained(config=pa.IA3Config(), provenance={"data": "tweets"}), "a", "mood",
                         tags=["sentiment"])
    assert [v.ref for v in store.list(method="ia3")] == ["mood@1"]
    assert [v.ref for v in store.list(tag="topic")] == ["news@1"]
    assert [v.ref for v in store.list()] == ["mood@1", "news@1"]
    assert [v.ref for v in store.search("bbc")] == ["news@1"]             # description and provenance
    assert [v.ref for v in store.search("tweets")] == ["mood@1"]          # data set
    assert [v.ref for v in store.search("test_accuracy")] == ["news@1"]   # a metric's name
    assert [v.ref for v in store.search("sentim")] == ["mood@1"]          # word prefixes, tags
    assert [v.ref for v in store.search("news topics")] == ["news@1"]     # every word must match
    assert store.search('"; DROP TABLE versions; --') == []                # FTS syntax is quoted away
    with pytest.raises(StoreError, match="no words"):
        store.search("  ")
    store.tag("mood", ["topic"])
    assert [v.ref for v in store.list(tag="topic")] == ["mood@1", "news@1"]
    assert sorted(v.ref for v in store.search("topic")) == ["mood@1", "news@1"]
    store.tag("mood", ["topic"], remove=True)
    assert [v.ref for v in store.list(tag="topic")] == ["news@1"]


def test_compatible_with_by_fingerprint_or_sites(store, tmp_path):
    store.add_from_model(trained("bert"), "a", "on-bert")
    store.add_from_model(trained("llama"), "a", "on-llama")
    pm = trained("bert")
    pm.save_adapter("a", tmp_path / "peft", format="peft")
    store.add(tmp_path / "peft", name="nofp")                            # no fingerprint: site check
    assert [v.ref for v in store.list(compatible_with=fresh("bert"))] == ["nofp@1", "on-bert@1"]
    assert [v.ref for v in store.list(compatible_with=make_model("llama"))] == ["on-llama@1"]
    from conftest import tiny_bert
    torch.manual_seed(0)
    other_head = tiny_bert(num_labels=5)                                 # other fingerprint, same sites
    assert [v.ref for v in store.list(compatible_with=other_head)] == ["nofp@1", "on-bert@1"]
    from transformers import BertConfig, BertForSequenceClassification
    wider = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64))
    assert store.list(compatible_with=wider) == []                       # same names, other widths
    with pytest.raises(pa.ShapeMismatchError):                           # and loading says why
        store.load_into(pa.AdapterModel(wider), "nofp")
    make_model("bert").save_pretrained(tmp_path / "hf-bert")            # a local HF folder, by path
    assert [v.ref for v in store.list(compatible_with=str(tmp_path / "hf-bert"))] == ["nofp@1", "on-bert@1"]


# ---------------------------------------------------------------------- export
def test_export_native_and_peft(store, tmp_path):
    pm = trained("llama")
    store.add_from_model(pm, "a", "x")
    x = make_inputs("llama")
    for fmt in ("native", "peft"):
        dst = store.export("x", tmp_path / fmt, format=fmt)
        target = fresh("llama")
        target.load_adapter(dst)
        torch.testing.assert_close(output_of(target, x), output_of(pm, x), rtol=0, atol=1e-6)
        with pytest.raises(FileExistsError):
            store.export("x", tmp_path / fmt, format=fmt)
        store.export("x", tmp_path / fmt, format=fmt, overwrite=True)
    assert json.loads((tmp_path / "native" / "polyadapter.json").read_text())["name"] == "x"


# ---------------------------------------------------------------------- names and paths
BAD_NAMES = ["../x", "a/b", "/etc/passwd", "..", ".hidden", "a\x00b", "\u0430dapter",  # Cyrillic a
             "ａｂｃ", "name\n", "a b", "a@b", "a.b", "x" * 65, "", "-lead", "C:\\x", "caf\u00e9"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_unsafe_names_are_refused_everywhere(store, tmp_path, bad):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    pm = trained()
    with pytest.raises(InvalidNameError):
        store.add_from_model(pm, "a", bad)
    if "@" not in bad:  # "a@b" is a fine reference (alias b of a), just not a name
        with pytest.raises(InvalidNameError):
            parse_ref(f"store:{bad}")
    store.add_from_model(pm, "a", "ok")
    with pytest.raises(InvalidNameError):
        store.add_from_model(pm, "a", "ok2", tags=[bad])
    with pytest.raises(InvalidNameError):
        store.set_alias("ok", bad)
    with pytest.raises(InvalidNameError):
        store.resolve(f"ok@{bad}" if bad else "ok@")
    after = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    assert all(str(p).startswith("store") for p in after - set(before))  # nothing written outside the store


def test_reserved_adapter_names_are_refused_as_store_names(store):
    with pytest.raises(InvalidNameError, match="reserved"):
        store.add_from_model(trained(), "a", "training")
    with pytest.raises(InvalidNameError, match="reserved"):
        parse_ref("store:keys@1")
    assert store.add_from_model(trained(), "a", "ok", tags=["training"]).tags == ["training"]  # fine as a tag


def test_hooks_for_store_refs(tmp_path):
    from polyadapter.store import load_from_store, save_to_store
    root = tmp_path / "s"
    Store.init(root).close()
    pm = trained(seed=4)
    assert save_to_store(pm, "a", "store:mine@prod", store=root).ref == "mine@1"
    assert save_to_store(pm, "a", "store:mine", store=root).ref == "mine@2"
    with pytest.raises(StoreError, match="numbers versions itself"):
        save_to_store(pm, "a", "store:mine@7", store=root)
    target = fresh()
    record = load_from_store(target, "store:mine@prod", store=root)
    assert record.name == "mine" and record.provenance["store"]["version"] == 1
    x = make_inputs("bert")
    torch.testing.assert_close(output_of(target, x), output_of(pm, x), rtol=0, atol=0)


def test_refs_and_default_path(monkeypatch, tmp_path):
    assert parse_ref("store:a@3") == Ref("a", version=3)
    assert parse_ref("a@prod") == Ref("a", alias="prod") and str(parse_ref("a@prod")) == "a@prod"
    assert is_store_ref("store:a") and not is_store_ref("runs/a") and not is_store_ref(None)
    with pytest.raises(InvalidNameError, match="from 1"):
        parse_ref("a@0")
    monkeypatch.setenv("POLYADAPTER_HOME", str(tmp_path / "home"))
    assert default_store_path() == tmp_path / "home" / "store"
    monkeypatch.delenv("POLYADAPTER_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_store_path() == tmp_path / "cache" / "polyadapter" / "store"
    with pytest.raises(StoreNotFoundError, match="polyadapter store init"):
        Store()
    Store.init().close()
    assert (tmp_path / "cache" / "polyadapter" / "store" / "index.sqlite").is_file()


# ---------------------------------------------------------------------- integrity
@pytest.mark.parametrize("damage", ["bitflip", "truncate", "delete"])
def test_corrupt_blob_is_refused_on_load_and_named_by_verify(store, damage):
    store.add_from_model(trained(seed=1), "a", "good")
    bad = store.add_from_model(trained(seed=2), "a", "bad")
    path = blobs.blob_path(store.path, bad.blob)
    data = bytearray(path.read_bytes())
    os.chmod(path, 0o644)
    if damage == "bitflip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) - 7]))
    else:
        path.unlink()
    pm = trained(seed=3)
    x = make_inputs("bert")
    before = output_of(pm, x)
    with pytest.raises(IntegrityError, match="adapter bad@1"):
        store.load_into(pm, "bad")
    assert pm.adapters == ["a"] and pm.active_adapters == ("a",)           # the model is unchanged
    torch.testing.assert_close(output_of(pm, x), before, rtol=0, atol=0)
    store.load_into(pm, "good")                                          # the others still load
    report = store.verify()
    assert not report.ok and len(report.problems) == 1 and "used by bad@1" in report.problems[0]
    with pytest.raises(IntegrityError):
        store.export("bad", store.path.parent / "out")


def test_newer_schema_refused_and_v1_store_migrates(tmp_path):
    s = Store.init(tmp_path / "new")
    s.close()
    with sqlite3.connect(tmp_path / "new" / "index.sqlite") as c:
        c.execute("UPDATE schema_info SET value='99' WHERE key='schema_version'")
    with pytest.raises(SchemaError, match="schema version 99, newer.*upgrade polyadapter"):
        Store(tmp_path / "new")

    # a version-1 store, written as polyadapter with schema 1 wrote it
    old = tmp_path / "old"
    (old / "blobs").mkdir(parents=True)
    pm = trained(provenance={"data": "bbc"})
    tensors = pm.adapter_state_dict("a")
    sha, _ = blobs.write_blob(old, blobs.tensors_to_bytes(tensors))
    from polyadapter.store import native_meta
    meta = native_meta(name="legacy", config=pm.record("a").config.to_dict(), sites=pm.record("a").sites,
                       saved_modules=[], base_model=pm.state.base_fingerprint, provenance={"data": "bbc"},
                       num_parameters=sum(t.numel() for t in tensors.values()))
    with sqlite3.connect(old / "index.sqlite") as c:
        schema.create_v1(c, "old-store")
        c.execute("INSERT INTO adapters(name, next_version, created) VALUES ('legacy', 2, 0)")
        c.execute("INSERT INTO blobs VALUES (?, 0, 0)", (sha,))
        c.execute("INSERT INTO versions(adapter_id, version, blob, meta, description, created) "
                  "VALUES (1, 1, ?, ?, 'from v1', 0)", (sha, json.dumps(meta)))
        c.execute("INSERT INTO tags VALUES (1, 'old')")
    s = Store(old)
    assert schema.read_version(s._conn) == schema.SCHEMA_VERSION and s.id == "old-store"
    v = s.resolve("legacy")
    assert (v.method, v.tags, v.size) == ("lora", ["old"], blobs.blob_path(old, sha).stat().st_size)
    assert v.shapes and v.structure_sha256 == pm.state.base_fingerprint["structure_sha256"]
    assert [x.ref for x in s.search("bbc")] == ["legacy@1"] and [x.ref for x in s.list(tag="old")] == ["legacy@1"]
    target = fresh()
    s.load_into(target, "legacy")
    x = make_inputs("bert")
    torch.testing.assert_close(output_of(target, x), output_of(pm, x), rtol=0, atol=0)
    assert s.add_from_model(pm, "a", "legacy").ref == "legacy@2"
    s.close()


# ---------------------------------------------------------------------- command line
def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_verbs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POLYADAPTER_HOME", str(tmp_path / "home"))
    trained(seed=1, provenance={"data": "bbc", "metrics": {"test_accuracy": 0.9}}).save_adapter("a", tmp_path / "a")
    trained(seed=2).save_adapter("a", tmp_path / "b", format="peft")
    (tmp_path / "run").mkdir()
    trained(seed=3).save_adapter("a", tmp_path / "run" / "adapter")      # a run folder (train --out)

    assert run_cli(capsys, "store", "init")[0] == 0                        # the default location
    assert run_cli(capsys, "store", "add", str(tmp_path / "a"), "--name", "news", "--tag", "bbc",
                   "--alias", "prod", "--description", "topics")[1].startswith("added news@1")
    assert run_cli(capsys, "store", "add", str(tmp_path / "b"), "--name", "news")[1].startswith("added news@2")
    assert run_cli(capsys, "store", "add", str(tmp_path / "run"), "--name", "child", "--parent", "news@1")[0] == 0
    code, out, _ = run_cli(capsys, "store", "list", "--json")
    assert code == 0 and [d["ref"] for d in json.loads(out)] == ["child@1", "news@1", "news@2"]
    make_model("bert").save_pretrained(tmp_path / "hf-bert")
    code, out, _ = run_cli(capsys, "store", "list", "--compatible-with", str(tmp_path / "hf-bert"), "--json")
    assert code == 0 and len(json.loads(out)) == 3
    code, out, _ = run_cli(capsys, "store", "list", "--tag", "bbc")
    assert "news@1" in out and "news@2" not in out
    assert "news@1" in run_cli(capsys, "store", "search", "topics")[1]
    code, out, _ = run_cli(capsys, "store", "show", "child")
    assert code == 0 and "└── news@1 (parent)" in out
    code, out, _ = run_cli(capsys, "store", "show", "news@prod")
    assert "metrics.test_accuracy  0.9000" in out and "derived from it: child@1" in out
    assert run_cli(capsys, "store", "export", "news@2", str(tmp_path / "exp"), "--format", "peft")[0] == 0
    assert (tmp_path / "exp" / "adapter_config.json").is_file()
    assert run_cli(capsys, "store", "alias", "news@2", "prod")[1].strip() == "news@prod -> news@2"
    assert run_cli(capsys, "store", "verify")[0] == 0

    for argv, message in [
        (("store", "rm", "news@1"), "derive from it: child@1"),
        (("store", "rm", "news"), "has 2 versions"),
        (("store", "show", "ghost"), "no adapter 'ghost'"),
        (("store", "add", str(tmp_path / "a"), "--name", "../evil"), "is not valid"),
        (("store", "list", "--store", str(tmp_path / "none")), "polyadapter store init"),
        (("store", "export", "news", str(tmp_path / "exp")), "already exists"),
    ]:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)

    assert run_cli(capsys, "store", "rm", "child")[0] == 0
    assert run_cli(capsys, "store", "--store", str(tmp_path / "home" / "store"), "rm", "news", "--all")[0] == 0
    assert "removed 3 unused blob(s)" in run_cli(capsys, "store", "gc")[1]
    # a corrupt store: verify names it and exits 2
    store = Store()
    v = store.add_from_model(trained(), "a", "z")
    store.close()
    blobs.blob_path(store.path, v.blob).write_bytes(b"garbage")
    code, out, err = run_cli(capsys, "store", "verify")
    assert code == 2 and "used by z@1" in out and "1 problem(s)" in err and len(err.strip().splitlines()) == 1
