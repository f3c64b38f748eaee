"""The job-type registry is complete and consistent: every entry's parts exist and agree."""

from __future__ import annotations

import pytest

from shared.core.config import Settings
from shared.core.inputs import SourceJob, SourceUpload
from shared.core.jobtypes import JOB_TYPES, QUEUES, job_type, parse_submit
from shared.core.schemas import InvalidRequest, Params


@pytest.mark.parametrize("entry", JOB_TYPES.values(), ids=list(JOB_TYPES))
def test_each_entry_is_complete(entry) -> None:
    assert JOB_TYPES[entry.name] is entry and entry.summary
    assert issubclass(entry.params, Params)
    assert entry.queue in QUEUES
    fields = entry.params.model_fields
    for spec in entry.inputs:
        assert spec.field in fields, f"{entry.name}: input {spec.field} is not a params field"
        if isinstance(spec, SourceUpload) and spec.first_step is not None:
            step = JOB_TYPES[spec.first_step]
            assert spec.field in step.params.model_fields
            assert any(isinstance(s, SourceUpload) and s.kind == spec.kind for s in step.inputs)
        if isinstance(spec, SourceJob):
            assert spec.needs and all(spec.needs)
    assert entry.artifacts, f"{entry.name} declares no artifacts"


def test_artifact_names_follow_the_format_and_end_with_metadata() -> None:
    _, entry, params = parse_submit(
        {"type": "generate", "params": {"tags": "piano", "format": "wav"}}, Settings()
    )
    assert entry.artifact_names(params) == (
        "tokens.npy",
        "audio.wav",
        "preview.png",
        "metadata.json",
    )
    assert job_type("transcribe").artifact_names(params)[-1] == "metadata.json"


def test_unknown_types_are_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known: .*generate"):
        job_type("karaoke")
    with pytest.raises(InvalidRequest) as caught:
        parse_submit({"type": "karaoke", "params": {}}, Settings())
    assert caught.value.field == "type" and "generate" in caught.value.message


def test_the_cli_offers_every_type_with_every_param() -> None:
    from api.client.cli import build_parser
    from api.client.submit_options import option_name

    parser = build_parser()
    for name, entry in JOB_TYPES.items():
        args = ["submit", name]
        uploads = {s.field: s for s in entry.inputs if isinstance(s, SourceUpload)}
        for field in entry.params.model_fields:
            if field in uploads:
                continue
            if field in ("tags", "source_job_id", "start_s", "end_s", "dataset_id"):
                args += [option_name(field), "1" if field.endswith("_s") else "x"]
        if uploads and not any(s.field == "source_job_id" for s in entry.inputs):
            args += ["--audio", "song.wav"]
        parsed = parser.parse_args(args)
        expected = [f for f in entry.params.model_fields if f not in uploads]
        assert parsed.param_names == expected and parsed.upload_fields == list(uploads)
