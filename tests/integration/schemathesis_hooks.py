"""schemathesis hooks for the contract test (loaded through SCHEMATHESIS_HOOKS).

The agent's contract: a request valid under the published schema may be refused with
400/404/409 (it names a file or object that does not exist, or the object's state is in
the way: things no schema can know) but never with 422, except for a rule across fields,
or a length in bytes (a JSON schema counts characters), which the models' descriptions
state (the problem body marks those errors `cross_field` and `byte_length`).
schemathesis' own positive_data_acceptance is configured to let 400 and 422 through;
this check then fails every other 422 on schema-valid data.
"""

from __future__ import annotations

import schemathesis
from schemathesis import CheckContext, Response
from schemathesis.generation.case import Case

# hvagent.spec.CROSS_FIELD, BYTE_LENGTH
UNSTATABLE = frozenset({"cross_field", "byte_length"})


@schemathesis.check
def schema_valid_data_breaks_only_cross_field_rules(ctx: CheckContext, response: Response,
                                                    case: Case) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    try:
        errors = response.json().get("errors", [])
    except ValueError:
        errors = []
    other = [e for e in errors if e.get("type") not in UNSTATABLE]
    if other or not errors:
        raise AssertionError(
            f"schema-valid request answered 422 for rules the schema does not state: "
            f"{other or response.text[:500]}")
    return None
