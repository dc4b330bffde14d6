"""The kernel tests run the Triton kernels on CPU tensors, in Triton's interpreter (TRITON_INTERPRET=1).

`@triton.jit` chooses the interpreter when a function is decorated, and by the time a test runs,
torch or transformers has usually imported triton already, its library functions (`tl.max`,
`tl.rand`, ...) decorated for compilation. So `interpreted` imports the kernel modules afresh with
the variable set, and while they run lets a compiled-mode library function called from inside an
interpreted kernel run interpreted too (what it would be had triton been imported under the
variable). After each test module the environment, triton and the kernel modules are put back as
they were: nothing outside this directory runs under the interpreter. Without triton the tests
fail, saying so; they never skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

_PACKAGE = "blockpress.workers.kernels"
_KERNEL_MODULES = ("_triton_math", "_moe_triton", "_sampler_triton")


@pytest.fixture(scope="module")
def interpreted() -> Iterator[SimpleNamespace]:
    """The kernel modules (`moe`, `sampler`) as the interpreter runs them; TRITON_INTERPRET=1 meanwhile."""
    if importlib.util.find_spec("triton") is None:
        pytest.fail("triton is not installed: the kernel tests run the Triton kernels (pip install 'triton>=3.2')")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    names = [f"{_PACKAGE}.{m}" for m in _KERNEL_MODULES]
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    package = importlib.import_module(_PACKAGE)
    interpreters: dict[int, Any] = {}

    def call_interpreted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if id(self) not in interpreters:
            interpreters[id(self)] = (self, InterpretedFunction(self.fn))
        return interpreters[id(self)][1](*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setattr(JITFunction, "__call__", call_interpreted)
        try:
            yield SimpleNamespace(
                moe=importlib.import_module(f"{_PACKAGE}._moe_triton"),
                sampler=importlib.import_module(f"{_PACKAGE}._sampler_triton"),
            )
        finally:
            for name in names:
                sys.modules.pop(name, None)
                package.__dict__.pop(name.rsplit(".", 1)[1], None)
            sys.modules.update(saved)
