"""`heartcluster submit TYPE` options, derived from the job-type registry.

Each params field becomes an option (`duration_s` → `--duration`, `top_k` → `--top-k`) with
its type, choices and description from the params model; an upload field becomes a file option
(`--audio FILE`, `--tokens FILE`) that is uploaded before the submit; a source job and an upload
that are alternatives form one required either-or group. Unset options are not sent, so the
gateway's defaults apply (e.g. the parent's tags for extend).
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from shared.core.inputs import SourceUpload
from shared.core.jobtypes import JOB_TYPES, JobType

UPLOAD_OPTION = {"audio": "audio", "tokens": "tokens"}  # upload kind → option name


def option_name(field: str) -> str:
    """`duration_s` → `--duration` (seconds fields drop their unit), `top_k` → `--top-k`."""
    return "--" + field.removesuffix("_s").replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """`float | None` → float; Literal stays."""
    if get_origin(annotation) in (Union, types.UnionType):
        return next(arg for arg in get_args(annotation) if arg is not type(None))
    return annotation


def _add_field(parser: Any, name: str, info: FieldInfo, required: bool) -> None:
    base = _base_type(info.annotation)
    kwargs: dict[str, Any] = {"dest": name, "default": None}
    if get_origin(base) is Literal:
        kwargs["choices"] = get_args(base)
    elif base in (int, float):
        kwargs["type"] = base
    elif get_origin(base) is list:  # e.g. finetune --targets q_proj v_proj
        kwargs["nargs"] = "+"
    text = info.description or ""
    kwargs["metavar"] = "SECONDS" if name.endswith("_s") else name.upper()
    if name.endswith("_s") and "second" not in text.lower():
        text = f"in seconds. {text}".strip()
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    if default is not None:
        text = f"{text} (default: {default})".strip()
    if required:
        kwargs["required"] = True
    parser.add_argument(option_name(name), help=text or None, **kwargs)


def add_submit_options(parser: argparse.ArgumentParser, entry: JobType) -> None:
    """The options of one job type; sets `param_names` and `upload_fields` on the namespace."""
    uploads = {spec.field: spec for spec in entry.inputs if isinstance(spec, SourceUpload)}
    sources = entry.alternative_sources
    either_or = parser.add_mutually_exclusive_group(required=True) if sources else None
    for name, info in entry.params.model_fields.items():
        if name in uploads:
            kind = uploads[name].kind
            target = either_or or parser
            target.add_argument(
                f"--{UPLOAD_OPTION[kind]}",
                dest=f"upload:{name}",
                metavar="FILE",
                required=either_or is None and info.is_required(),
                help=f"a local {kind} file to upload and use as {name}",
            )
        elif either_or is not None and name in sources:
            _add_field(either_or, name, info, required=False)
        else:
            _add_field(parser, name, info, required=info.is_required())
    parser.set_defaults(
        param_names=[n for n in entry.params.model_fields if n not in uploads],
        upload_fields=list(uploads),
    )


def submit_parsers(
    kinds: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """One `submit TYPE` parser per registered job type."""
    for entry in JOB_TYPES.values():
        parser = kinds.add_parser(entry.name, help=entry.summary, description=entry.summary)
        add_submit_options(parser, entry)
        common(parser)
