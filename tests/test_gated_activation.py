import pytest
import torch
import torch.nn.functional as F

from lmforge.model.layers import gated_activation


def reference(gate, up, kind):
    return (F.silu(gate) if kind == "swiglu" else F.gelu(gate, approximate="tanh")) * up


def saved_bytes(fn, *args):
    """Bytes of the distinct storages autograd keeps for backward while `fn(*args)` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(storages.values())


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_are_those_of_autograd_with_one_tensor_less_saved(kind, dtype):
    g = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(4, 7, 2 * 64, generator=g)).to(dtype).requires_grad_()  # [gate; up] as the MLP makes it
    grad = torch.randn(4, 7, 64, generator=g).to(dtype)
    outs, grads, saved = [], [], []
    for fn in (reference, gated_activation):
        gate, up = (h * 1).chunk(2, dim=-1)  # the fresh [tokens, 2 d_ff] tensor a linear layer gives
        out, nbytes = saved_bytes(fn, gate, up, kind)
        outs.append(out)
        grads.append(torch.autograd.grad(out, h, grad)[0])
        saved.append(nbytes)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    tokens_x_dff = 4 * 7 * 64 * h.element_size()
    assert saved[0] - saved[1] == tokens_x_dff  # act(gate) is no longer kept


def test_no_graph_when_nothing_needs_a_gradient():
    gate, up = torch.randn(3, 8), torch.randn(3, 8)
    out = gated_activation(gate, up, "swiglu")
    assert out.grad_fn is None and torch.equal(out, reference(gate, up, "swiglu"))


def test_compiles_to_the_same_gradients():
    torch._dynamo.reset()
    h = torch.randn(5, 32, requires_grad=True)
    step = torch.compile(lambda x: gated_activation(*x.chunk(2, dim=-1), "swiglu").square().sum())
    (got,) = torch.autograd.grad(step(h), h)
    (want,) = torch.autograd.grad(reference(*h.chunk(2, dim=-1), "swiglu").square().sum(), h)
    torch.testing.assert_close(got, want)
