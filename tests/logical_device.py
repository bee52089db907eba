"""A logical ``cuda`` device on a machine without a GPU, for device-placement tests.

:class:`LogicalCuda` runs every operation on the CPU (real data, so data-dependent shapes,
masks and sparse dispatch work) while tensors carry a device label: a tensor labelled ``cuda``
reports ``device == cuda:0``, and an operation that mixes a ``cuda`` tensor with a non-scalar
CPU one raises :class:`DeviceMismatch` naming the project's source line, as a GPU would
("Expected all tensors to be on the same device"). The rules, those of CUDA tensors:

* the tensor inputs of an operation share one device, except 0-dim CPU tensors (scalars),
  the indices of an indexing operation and the source of a copy;
* a factory (``torch.zeros``, ``torch.arange``, ``torch.tensor`` ...) without ``device=``
  makes a CPU tensor; ``device="cuda"`` or ``device=x.device`` a ``cuda`` one;
* ``.to(device)``, ``.cuda()`` and ``.cpu()`` change the label; ``.numpy()`` of a ``cuda``
  tensor fails.

FakeTensorMode checks the same rule without data, so it stops at the first data-dependent
shape (``nonzero``, boolean masks); this keeps the data.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten
# Operations whose inputs may sit on two devices on a GPU too (positions of the exempt inputs).
CROSS_DEVICE = {aten._to_copy.default: None, aten.copy_.default: None, aten.copy.default: None,
                aten._copy_from.default: None, aten._copy_from_and_resize.default: None,
                aten.index.Tensor: {1}, aten.index_put_.default: {1}, aten.index_put.default: {1},
                aten._index_put_impl_.default: {1}}


class DeviceMismatch(RuntimeError):
    """An operation mixed a ``cuda`` tensor with a non-scalar CPU tensor."""


def project_line() -> str:
    """``path:line`` of the innermost frame in this project's code (tests excluded), else the innermost frame."""
    frames = traceback.extract_stack()[:-1]
    for frame in reversed(frames):
        path = Path(frame.filename)
        if path.is_relative_to(ROOT) and ".venv" not in path.parts and path.name != "logical_device.py":
            inside = path.relative_to(ROOT)
            if inside.parts[0] != "tests":
                return f"{inside}:{frame.lineno}"
    outside = [f for f in frames if "site-packages" not in f.filename and not f.filename.endswith("logical_device.py")]
    frame = (outside or frames)[-1]
    path = Path(frame.filename)
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{frame.lineno}"


class CudaLabelled(torch.Tensor):
    """A CPU tensor (``elem``) that reports device ``cuda:0``; only :class:`LogicalCuda` runs operations on it."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=CPU, requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    # The label Python code sees (``x.device``, ``device=x.device``); C++ keeps running it on the CPU.
    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False

    def __repr__(self) -> str:
        return f"CudaLabelled({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a cuda-labelled tensor outside LogicalCuda")


def is_cuda(value) -> bool:
    return isinstance(value, CudaLabelled)


def _device_kind(device) -> str | None:
    if device is None:
        return None
    if isinstance(device, int):  # an ordinal is a CUDA device
        return "cuda"
    return torch.device(device).type


def on_cuda(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` labelled ``cuda`` (outside the mode: to place inputs)."""
    if is_cuda(tensor):
        return tensor
    out = CudaLabelled(tensor.detach())
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=tensor.requires_grad)
    return out.requires_grad_(tensor.requires_grad)  # a leaf, as a factory's result


FACTORIES = {getattr(torch, name) for name in (
    "tensor", "as_tensor", "from_numpy", "zeros", "ones", "empty", "full", "arange", "linspace", "logspace", "rand",
    "randn", "randint", "randperm", "eye", "scalar_tensor", "empty_strided")}


class _Context:
    """What the Python call being run is: ``factory`` (its device is the one asked for), or whether
    it touches a ``cuda`` tensor. C++ code makes tensors with its inputs' options, which name the
    CPU here: they take the label of the call (``loss.backward()`` included)."""

    call = "cpu"


class _Dispatch(TorchDispatchMode):
    def __init__(self, context: _Context) -> None:
        super().__init__()
        self.context = context

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        exempt = CROSS_DEVICE.get(func, set())
        if exempt is not None:
            checked = [a for i, a in enumerate(args) if i not in exempt] + list(kwargs.values())
            tensors = [t for t in tree_flatten(checked)[0] if isinstance(t, torch.Tensor)]
            kinds = {"cuda" if is_cuda(t) else "cpu" for t in tensors if is_cuda(t) or t.dim() > 0}
            if len(kinds) > 1:
                shapes = ", ".join(f"{'cuda' if is_cuda(t) else 'cpu'}{tuple(t.shape)}" for t in tensors)
                raise DeviceMismatch(f"{project_line()}: {func} mixes devices: {shapes}")
            generator = kwargs.get("generator")
            if generator is not None and kinds == {"cuda"} and generator.device.type == "cpu":
                raise DeviceMismatch(f"{project_line()}: {func} draws cuda values from a CPU generator")
        flat = tree_flatten((args, kwargs))[0]
        target = _device_kind(kwargs.get("device"))
        if "device" in kwargs and target == "cuda":
            kwargs["device"] = CPU
        if target == "cpu" and self.context.call == "cuda" and func is not aten._to_copy.default:
            target = "cuda"  # made by C++ code with a cuda tensor's options (they name the CPU here)
        inputs = [t for t in flat if isinstance(t, torch.Tensor)]
        if target is None:
            if func in CROSS_DEVICE and inputs:  # a copy's result lives where its destination is
                target = "cuda" if is_cuda(inputs[0]) else "cpu"
            else:
                target = "cuda" if any(is_cuda(t) for t in inputs) else "cpu"
        wrappers = {id(t.elem): t for t in flat if is_cuda(t)}
        plain = {id(t): t for t in flat if isinstance(t, torch.Tensor) and not is_cuda(t)}
        args, kwargs = tree_map(lambda t: t.elem if is_cuda(t) else t, (args, kwargs))
        out = func(*args, **kwargs)

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) in wrappers:  # an in-place operation returns its input
                return wrappers[id(t)]
            if id(t) in plain:
                return plain[id(t)]
            return CudaLabelled(t) if target == "cuda" else t

        return tree_map(wrap, out)


_TO = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}


class _Function(TorchFunctionMode):
    """Calls that would start CUDA (``device="cuda"``, ``.to("cuda")``, ``.cuda()``) run on the CPU, labelled."""

    def __init__(self, context: _Context) -> None:
        super().__init__()
        self.context = context

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        before = self.context.call
        if func in FACTORIES or "device" in kwargs:
            self.context.call = "factory"
        else:
            self.context.call = "cuda" if any(is_cuda(t) for t in tree_flatten((args, kwargs))[0]) else "cpu"
        try:
            return self._call(func, args, kwargs)
        finally:
            self.context.call = before

    def _call(self, func, args, kwargs):
        if func is torch.Tensor.numpy and is_cuda(args[0]):
            raise DeviceMismatch(f"{project_line()}: numpy() of a cuda tensor (call .cpu() first)")
        if func is torch.Tensor.tolist and is_cuda(args[0]):  # a copy to the host, as on a GPU
            return args[0].elem.tolist()
        if func in _TO:
            self_, *rest = args
            if func is not torch.Tensor.to:
                device = CUDA if func is torch.Tensor.cuda else CPU
                dtype, memory_format, copy = None, None, False
            else:
                copy = kwargs.pop("copy", False)
                if rest and isinstance(rest[0], torch.Tensor):  # .to(other): other's label and dtype
                    device, dtype, memory_format = rest[0].device, rest[0].dtype, None
                else:
                    device, dtype, _, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
            if _device_kind(device) == "cuda":
                same_dtype = dtype is None or dtype == self_.dtype
                if is_cuda(self_) and same_dtype and memory_format is None and not copy:
                    return self_
                return aten._to_copy.default(self_, dtype=dtype or self_.dtype, device=CUDA,
                                             memory_format=memory_format)
            if _device_kind(device) == "cpu" and is_cuda(self_):  # C++ sees a CPU tensor: .to(cpu) would be a no-op
                return aten._to_copy.default(self_, dtype=dtype or self_.dtype, device=CPU,
                                             memory_format=memory_format)
            return func(*args, **kwargs)
        if _device_kind(kwargs.get("device")) == "cuda":
            kwargs["device"] = CPU
            return on_cuda(func(*args, **kwargs))
        return func(*args, **kwargs)


class LogicalCuda:
    """``with LogicalCuda():`` the rules above apply (see the module docstring)."""

    def __enter__(self):
        context = _Context()
        self._modes = [_Function(context), _Dispatch(context)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False


def module_on_cuda(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and buffer of ``module`` labelled ``cuda`` (in place; call inside :class:`LogicalCuda`)."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, value in store.items():
                if value is not None:
                    store[name] = on_cuda(value)
    if hasattr(module, "_device"):  # a LightningModule's ``device``
        module._device = CUDA
    return module
