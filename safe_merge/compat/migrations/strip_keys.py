"""Remove the config keys the target release lacks, when the history table says their value is harmless there;
refuse the rest. Keys the table does not know go only when their value is empty (null, false, {}, [], "")."""

from __future__ import annotations

from safe_merge.compat.migrations.base import Context, Refusal, Refused, State

ID = "strip-unknown-keys"
EMPTY = (None, False, {}, [], "")


def _is_empty(value: object) -> bool:
    return any(value is e or (type(value) is type(e) and value == e) for e in EMPTY)


def applies(state: State, ctx: Context) -> bool:
    return any(v.action != "keep" for v in ctx.history.assess(state.config, ctx.target))


def apply(state: State, ctx: Context) -> str:
    stripped, refused = [], []
    for verdict in ctx.history.assess(state.config, ctx.target):
        if verdict.action == "refuse":
            refused.append(Refused(verdict.key, verdict.value, verdict.first, verdict.reason))
        elif verdict.action == "unknown" and not _is_empty(verdict.value):
            refused.append(Refused(verdict.key, verdict.value, None, "a key the history table does not know"))
        elif verdict.action in ("strip", "unknown"):
            del state.config[verdict.key]
            stripped.append(verdict.key)
    if refused:
        raise Refusal(*refused)
    return f"{len(stripped)} keys {ctx.target} lacks, removed (values harmless there): {', '.join(stripped)}"
