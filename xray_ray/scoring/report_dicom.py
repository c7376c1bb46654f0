"""The scoring report's PACS and DICOM-results section: what the night took from the PACS and what it sent back.

From the run's state (`scoring.pacs.write_instance_list`'s counts, `scoring.dicom_out`'s) and
its rows: studies found, instances selected, skipped by reason, SRs and heat-map captures
written or stored, stores refused, inputs that got no SR because they were not DICOM, and
what writing the results cost per image.
"""

from __future__ import annotations

import pandas as pd

from xray_ray.reports.html import Metrics, Section, Table, Text


def skipped_by_reason(rows: pd.DataFrame) -> dict[str, int]:
    """The rows the PACS selection rules left out, counted by reason."""
    skipped = rows[rows["status"] == "skipped"]
    return {str(code): int(n) for code, n in skipped["error_code"].value_counts().sort_index().items()}


def dicom_summary(state: dict, rows: pd.DataFrame) -> dict:
    """The summary's `pacs` and `dicom_results` entries (None when the run had neither)."""
    pacs = state.get("pacs")
    if pacs is not None:
        pacs = {**pacs, "skipped_this_night": skipped_by_reason(rows)}
    results = state.get("dicom_results")
    if results is not None:
        answered = results.get("sr_written", 0) or results.get("sr_stored", 0)
        results = {**results, "ms_per_image": round(1000 * results["seconds"] / answered, 2) if answered else None}
    return {"pacs": pacs, "dicom_results": results}


def dicom_section(summary: dict) -> Section | None:
    """The page's section on the PACS and the DICOM results, or None when the run had neither."""
    pacs, results = summary.get("pacs"), summary.get("dicom_results")
    if pacs is None and results is None:
        return None
    blocks = []
    if pacs is not None:
        blocks += [
            Metrics({"Studies found": pacs["studies"], "Instances found": pacs["instances"],
                     "Instances selected": pacs["selected"], "Skipped by the rules": sum(pacs["skipped"].values()),
                     **({"SRs stored": results.get("sr_stored", 0)} if results and results["stored_to_pacs"] else {})}),
            Text(f"The PACS was asked (QIDO-RS) for the studies of {pacs['study_date']}. Frontal chest radiographs "
                 "were fetched (WADO-RS) and scored; the rest were skipped without being fetched, for the reasons "
                 "below. An instance this model had already scored on an earlier night was not fetched again."),
        ]
        if pacs["skipped"]:
            blocks.append(Table([{"Reason skipped": code, "Instances": n} for code, n in pacs["skipped"].items()]))
    if results is not None:
        where = [f"{results.get('sr_written', 0)} written to {results['sr_out']}"] if results["sr_out"] else []
        if results["stored_to_pacs"]:
            where.append(f"{results.get('sr_stored', 0)} stored in the PACS, in the study each one describes")
        text = (f"Each answer for a DICOM image became a DICOM Structured Report (TID 1500, IHE AI Results "
                f"content, marked UNVERIFIED and research use only): {'; '.join(where) or 'none'}.")
        if captures := results.get("sc_written", 0) or results.get("sc_stored", 0):
            text += f" {captures} heat maps went with them as Secondary Captures (none for out-of-distribution images)."
        if refused := results.get("store_refused", 0):
            text += f" The PACS refused {refused} stores: those images are error rows (store_refused), tried again " \
                    "by the next run."
        if not_dicom := results.get("not_dicom", 0):
            text += f" {not_dicom} answered images were not DICOM (PNG, JPEG...) and got no SR."
        if results["ms_per_image"] is not None:
            text += f" Writing them cost {results['ms_per_image']} ms per image."
        blocks.append(Text(text))
    return Section("PACS and DICOM results", blocks)
