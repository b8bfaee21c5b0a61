"""Check, with `adapters` itself, that folders polyadapter wrote (format="adapters") load
there and compute the reference outputs. Runs INSIDE the `adapters` venv:

    .venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); \
        from test_adapterhub import export_all; export_all('/tmp/ahexport')"
    cd tests/adapterhub && ../../.venv-adapters/bin/python check_export.py /tmp/ahexport

EXPORT/<model>/adapters/<name>/ and EXPORT/<model>/fusion/fuse_<a>_<b>/ as written by
polyadapter (see the round-trip test); outputs are compared with the fixtures' references.
"""
from __future__ import annotations

import sys
from pathlib import Path

import adapters
import torch
from adapters import Fuse, Parallel, Stack
from make_fixtures import tiny_bert, tiny_llama
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
SETUPS = {
    "seq_bn": "seq_bn", "seq_bn_b": "seq_bn_b", "seq_bn_var": "seq_bn_var", "double_seq_bn": "double_seq_bn",
    "double_seq_bn_b": "double_seq_bn_b", "par_bn": "par_bn", "lora": "lora", "ia3": "ia3",
    "stack_seq_bn": Stack("seq_bn", "seq_bn_b"), "stack_lora_seq_bn": Stack("lora", "seq_bn"),
    "fuse_seq_bn": Fuse("seq_bn", "seq_bn_b"), "fuse_double_seq_bn": Fuse("double_seq_bn", "double_seq_bn_b"),
    "parallel": Parallel("seq_bn", "seq_bn_b"),
}


def main(export: Path) -> None:
    worst = 0.0
    for kind, build in (("bert", tiny_bert), ("llama", tiny_llama)):
        model = build().eval()
        model.load_state_dict(load_file(str(FIXTURES / kind / "base.safetensors")))
        adapters.init(model)
        for folder in sorted((export / kind / "adapters").iterdir()):
            model.load_adapter(str(folder), load_as=folder.name, use_safetensors=True)
        for folder in sorted((export / kind / "fusion").iterdir()):
            model.load_adapter_fusion(str(folder), use_safetensors=True)
        batch = load_file(str(FIXTURES / kind / "inputs.safetensors"))
        ref = load_file(str(FIXTURES / kind / "reference.safetensors"))
        for case, setup in SETUPS.items():
            names = [setup] if isinstance(setup, str) else list(setup.flatten())
            if any(n not in model.adapters_config for n in names):
                continue
            model.set_active_adapters(setup)
            with torch.no_grad():
                diff = (model(**batch).logits - ref[case]).abs().max().item()
            print(f"{kind:6s} {case:22s} {diff:.1e}")
            worst = max(worst, diff)
    print(f"max difference {worst:.1e}")
    sys.exit(0 if worst < 1e-5 else 1)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
