"""The scoring job's PACS source: a night's studies found over QIDO-RS become the run's file list.

`xray-ray score --pacs URL --study-date 20261201-20261202` scores the frontal chest
radiographs of the studies of those dates instead of archive folders:

- `connect` checks, before Ray starts, that the PACS answers with the run's credentials
  (`score.pacs_credentials`, a file; TLS verified unless `pacs_skip_tls_verify`); a PACS that
  cannot be reached stops the run with `PACS_UNREACHABLE` (exit 6), before anything is written;
- `write_instance_list` asks QIDO-RS for the studies, their series and instances, and writes one
  file-list entry per instance (`scoring.file_list`): its WADO-RS URL, which the read tasks fetch
  (`pipeline._read`), or, for an instance the selection rules leave out (`score.pacs_modalities`,
  `pacs_body_parts`, `pacs_views`), the reason as its code (`lateral_view`, `not_chest`,
  `not_radiograph`, `other_view`), which becomes a `skipped` row without a fetch.

The ledger keys an answered instance by its SOP Instance UID (`ledger.row_key`), so a second
night fetches nothing the same model has scored.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from xray_ray.config_services import ScoreConfig
from xray_ray.scoring.dicomweb import PacsClient, PacsError, PacsUnreachable, SelectionRules, instance_url
from xray_ray.scoring.file_list import FileList
from xray_ray.scoring.preflight import ScoreError

log = logging.getLogger(__name__)

PACS_UNREACHABLE = 6
"""Exit code of a run whose PACS cannot be reached (or refuses its credentials) when it starts; a credentials
file that cannot be used (missing, readable by others, not JSON, or bound for plain http off loopback) is exit 2."""

SKIP_WHY = {"lateral_view": "a lateral view (ViewPosition {view})",
            "not_chest": "not a chest image (BodyPartExamined {body_part})",
            "not_radiograph": "not a radiograph (Modality {modality})",
            "other_view": "a view not scored (ViewPosition {view})"}


def connect(options: ScoreConfig) -> PacsClient:
    """The run's PACS client, once the PACS has answered; ScoreError(PACS_UNREACHABLE) when it does not."""
    try:
        client = PacsClient(options.pacs, options.pacs_credentials, verify_tls=not options.pacs_skip_tls_verify,
                            timeout_s=options.pacs_timeout_s)
        client.check()
    except PacsUnreachable as err:
        raise ScoreError(f"the PACS at {options.pacs} cannot be reached: {err}; nothing was scored",
                         PACS_UNREACHABLE) from None
    except PacsError as err:
        if err.code == "bad_credentials":  # the run's own settings: fixed here, not at the PACS
            raise ScoreError(str(err), 2) from None
        raise ScoreError(f"the PACS at {options.pacs} refused this run: {err}", PACS_UNREACHABLE) from None
    except (OSError, ValueError) as err:
        raise ScoreError(f"the PACS at {options.pacs} refused this run: {err}", PACS_UNREACHABLE) from None
    return client


def rules_of(options: ScoreConfig) -> SelectionRules:
    """The selection rules the run's settings give."""
    return SelectionRules(modalities=tuple(options.pacs_modalities), body_parts=tuple(options.pacs_body_parts),
                          view_positions=tuple(options.pacs_views))


def write_instance_list(client: PacsClient, options: ScoreConfig, folder: Path) -> dict:
    """The file list of the night's instances (module docstring); returns what was found: studies, instances,
    selected, and skipped by reason. ScoreError(PACS_UNREACHABLE) when the PACS stops answering the queries."""
    files = FileList(folder, options.files_per_task)
    studies, skipped = set(), Counter()
    try:
        for candidate in client.find_instances(options.study_date, rules_of(options)):
            studies.add(candidate.study_uid)
            url = instance_url(client.url, candidate)
            if candidate.skip_reason:
                skipped[candidate.skip_reason] += 1
                why = SKIP_WHY.get(candidate.skip_reason, candidate.skip_reason)
                files.add(url, why.format(view=candidate.view_position or "absent",
                                          body_part=candidate.body_part or "absent",
                                          modality=candidate.modality or "absent"), candidate.skip_reason)
            else:
                files.add(url)
    except PacsError as err:
        raise ScoreError(f"the PACS at {options.pacs} stopped answering while the night's studies were listed: "
                         f"{err}; nothing was scored", PACS_UNREACHABLE) from None
    files.flush()
    found = {"studies": len(studies), "instances": files.written, "selected": files.written - sum(skipped.values()),
             "skipped": dict(sorted(skipped.items())), "study_date": options.study_date}
    log.info("PACS %s, study dates %s: %d studies, %d instances, %d selected", options.pacs, options.study_date,
             found["studies"], found["instances"], found["selected"])
    return found
