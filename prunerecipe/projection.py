"""What the plan knows of each tensor's mask as the steps go (exact counts, or estimates),
and torch's arithmetic for how much one step prunes: the bookkeeping under :mod:`.plan`."""

from __future__ import annotations

from collections.abc import Callable

from .amounts import is_count, normalize_dim, nparams_to_prune
from .layout import input_dim, input_dim_known
from .methods import MethodSpec
from .methods.semi_structured import nm_problem
from .planned import PlannedTarget, pruned_entries, pruned_slices
from .select import Target
from .spec import Step
from .text import shape_text


class PlanProblem(Exception):
    """A step that cannot be planned: ``key`` is the recipe key it is located at."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


class TensorState:
    """What the plan knows of one tensor's mask as the steps go."""

    __slots__ = ("entries", "entries_exact", "numel", "slices", "touched")

    def __init__(self, numel: int, entries: float) -> None:
        self.numel = numel
        self.entries = entries  # masked entries (exact, or an estimate)
        self.entries_exact = True
        self.slices: dict[int, tuple[int, bool]] = {}  # dim -> (masked slices, exact?)
        self.touched = False  # a planned step changed it: the model's mask no longer tells


class Projection:
    """Masked-entry and masked-slice counts per target as the steps go, without touching tensors.

    Counts read from existing masks and advanced by local unstructured (entries) or
    structured (slices along that dim) steps are exact. After a global step or a method
    without an amount they are estimates, and no int amount is rejected on an estimate.
    """

    def __init__(self) -> None:
        self.states: dict[tuple[int, str], TensorState] = {}
        self.groups: dict[tuple[str, ...], int] = {}  # scope: group: channels pruned, by the group's producers

    def state(self, t: Target) -> TensorState:
        key = (id(t.module), t.param)
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = TensorState(t.original.numel(), pruned_entries(t) if t.is_pruned else 0)
        return st

    def entries_of(self, t: Target) -> float:
        return self.state(t).entries

    def slices_of(self, t: Target, dim: int) -> tuple[int, bool]:
        st = self.state(t)
        if dim not in st.slices:
            st.slices[dim] = (0, False) if st.touched else (pruned_slices(t, dim), True)
        return st.slices[dim]


def plan_n_of_m(step: Step, spec: MethodSpec, t: Target, st: TensorState, pattern: tuple[int, int]) -> PlannedTarget:
    """An N:M step on one tensor: its input dimension must split into groups of ``m``; from a
    known mask with nothing pruned, exactly ``numel * (m - n) / m`` entries are pruned."""
    n, m = pattern
    shape = tuple(t.original.shape)
    if not shape:
        raise PlanProblem("method", f"{spec.name} needs a tensor with at least one dimension; {t.qualname} is a scalar")
    arg = spec.input_dim_arg
    dim = step.args.get(arg) if arg is not None else None
    if dim is None:
        if not input_dim_known(t.module, len(shape)):
            raise PlanProblem(
                "args",
                f"{t.qualname} is a {len(shape)}-D parameter (shape {shape_text(shape)}) of {type(t.module).__name__}, whose input "
                f"dimension cannot be told from the module (a MoE layer's stacked experts are (experts, out, in)): give it with "
                f"args: {{{arg}: ...}}",
            )
        dim = input_dim(t.module, t.param, len(shape))
    if not isinstance(dim, int) or isinstance(dim, bool) or not -len(shape) <= dim < len(shape):
        raise PlanProblem("args", f"dim {dim!r} is out of range for {t.qualname} of shape {shape}")
    problem = nm_problem(shape[normalize_dim(dim, len(shape))], m)
    if problem:
        raise PlanProblem("args" if step.args else "method", f"{t.qualname} (shape {shape_text(shape)}) {problem}")
    numel = st.numel
    before = st.entries
    before_exact = st.entries_exact
    exact = st.entries_exact and before == 0
    after = numel * (m - n) // m if exact else max(before, numel * (m - n) / m)
    to_prune = int(after) if exact else None
    st.entries = after
    st.entries_exact = exact
    st.slices = {}
    st.touched = True
    return PlannedTarget(t, numel, f"entries ({n}:{m})", int(before), to_prune, int(before), after if exact else None, numel, before_exact, exact)


def check_scheduled_count(step: Step, spec: MethodSpec, rows: list[PlannedTarget]) -> None:
    """A scheduled step's int ``amount`` larger than what its tensors have unpruned now (masked
    entries only ever grow) cannot run at any event: refused now, not mid-training."""
    amount = step.amount
    if amount is None or not is_count(amount) or spec.pruning_type == "structured":
        return
    left = [(pt.target.qualname, pt.units - (pt.pruned_before if pt.exact_before else 0)) for pt in rows]
    if step.scope == "global":
        total = sum(n for _, n in left)
        if amount > total:
            raise PlanProblem("amount", f"amount {amount} is more than the {total} unpruned entries of the {len(left)} targets together")
        return
    for name, n in left:
        if amount > n:
            raise PlanProblem("amount", f"amount {amount} is more than the {n} unpruned entries of {name}")


def step_count(step: Step, units: int, done: int, what: Callable[[], str], how: str, exact: bool) -> tuple[int, str | None]:
    """Units this step prunes out of ``units`` with ``done`` already pruned (``what`` describes
    them, for the error; it is only built when needed).

    An int amount larger than what is left is an error only when ``done`` is exact.
    """
    if step.sparsity is not None:
        wanted = round(step.sparsity * units)
        if wanted <= done:
            return 0, (
                f"target sparsity {step.sparsity:g} means {wanted} of {units} masked; {done} already are: no-op" + ("" if exact else " (projected)")
            )
        return wanted - done, None
    amount = step.amount if step.amount is not None else 0
    remaining = units - done
    k = nparams_to_prune(amount, remaining)
    if k > remaining and is_count(amount):
        if exact:
            raise PlanProblem(how, f"amount {amount} is more than {what()}")
        k = remaining
    return k, None
