"""Finding equations in jaxprs, for tests that check what a function traces to."""

from __future__ import annotations

import jax.extend


def pallas_calls(jaxpr) -> list:
    """Every pallas_call equation in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += pallas_calls(sub)
    return found


def dot_precisions(jaxpr) -> list:
    """The precision of every dot_general in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += dot_precisions(sub)
    return found


def primitives_outside(jaxpr, name_part: str) -> list[str]:
    """Names of the primitives in a jaxpr, nested ones included, except inside the
    jitted calls (pjit) whose name contains `name_part` (e.g. the op's own body)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("pjit", "jit") and name_part in str(eqn.params.get("name")):
            continue
        found.append(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += primitives_outside(sub, name_part)
    return found
