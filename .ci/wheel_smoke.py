"""Run from an installed wheel (not the source tree): a bf16 tiny model on CPU through the compiled kernels.

Checks that the kernel sources ship in the wheel (they are compiled here, into the cache XDG_CACHE_HOME names),
that the model runs through them, and that its logits and greedy tokens are those of the plain PyTorch float32
path on the same bf16 weights. Used by .ci/wheel.sh (a fresh virtualenv) and tests/test_wheel.py.
"""

import sys
import tempfile
from pathlib import Path

import torch

import qwen2vl
from qwen2vl import kernels
from qwen2vl.cpu import FastRMSNorm, WeightOnlyLinear
from qwen2vl.generate.decode import Prompt, generate_steps, greedy
from qwen2vl.testing.checkpoint import make_config, write_checkpoint

source_tree = Path(__file__).resolve().parents[1]
installed = Path(qwen2vl.__file__).resolve()
assert source_tree not in installed.parents, f"qwen2vl imported from the source tree: {installed}"
assert kernels.available(), "the CPU kernels did not build from the installed package (see the log line above)"

with tempfile.TemporaryDirectory() as tmp:
    ckpt = write_checkpoint(tmp, make_config(), seed=1, dtype=torch.bfloat16, tokenizer=False)
    fast = qwen2vl.load_model(ckpt, dtype=torch.bfloat16, progress=False)
    plain = qwen2vl.load_model(ckpt, dtype=torch.float32, progress=False, cpu_kernels=False)
assert isinstance(fast.lm_head, WeightOnlyLinear) and type(fast.model.norm) is FastRMSNorm
assert fast.lm_head.weight.dtype == torch.bfloat16 and fast.dtype == torch.float32

g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 1000, (2, 11), generator=g)
mask = torch.ones_like(ids)
mask[1, :3] = 0  # one left-padded row
with torch.no_grad():
    a, b = fast(ids, mask), plain(ids, mask)
diff = (a - b)[mask.bool()].abs().max().item()
assert diff <= 1e-4, f"bf16 weights through the kernels vs float32 PyTorch: max |logit diff| {diff:.3g}"
prompt = Prompt(ids, mask)
got = torch.stack([s.tokens for s in generate_steps(fast, prompt, greedy, 8)], 1)
want = torch.stack([s.tokens for s in generate_steps(plain, prompt, greedy, 8)], 1)
assert torch.equal(got, want), f"greedy tokens differ: {got.tolist()} vs {want.tolist()}"
print(
    f"wheel smoke ok: qwen2vl {qwen2vl.__version__} from {installed.parent}, kernels built, "
    f"max |logit diff| {diff:.2g}, 8 greedy tokens equal",
    file=sys.stderr,
)
