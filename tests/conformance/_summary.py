"""Turn a conformance run's JUnit XML into the optimizer × guarantee table (markdown).

    python -m pytest tests/conformance --junitxml=/tmp/conformance.xml
    python -m tests.conformance._summary /tmp/conformance.xml [--failures]

Cells: ``pass`` (every test of that cell passed), ``FAIL n/m`` (n of its m tests failed), ``skip`` (all
skipped; the reason is in the pytest output). ``--failures`` adds the first line of each failure.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

import lightning_optim as lo

COLUMNS = [
    ("resume torch.save", r"test_resume_exact_torch_save$"),
    ("DCP full (1 proc)", r"test_resume_exact_dcp_state_dict.*-full$"),
    ("DCP sharded (1 proc)", r"test_resume_exact_dcp_state_dict.*-sharded$"),
    ("FSDP2 train", r"test_fsdp2.*-straight$"),
    ("FSDP2 full", r"test_fsdp2.*-full$"),
    ("FSDP2 sharded", r"test_fsdp2.*-sharded$"),
    ("ModelParallel ckpt → 1 proc", r"test_modelparallel_checkpoint"),
    ("non-finite grad (optimizer)", r"test_nonfinite_gradient_changes_nothing"),
    ("NonFiniteGuard (Trainer)", r"test_nonfinite_guard_in_trainer"),
    ("bf16", r"test_bf16_short_run"),
    ("bad input", r"test_(empty_parameter_list|group_without_params|odd_parameter)"),
    ("corrupt / failed-save ckpt", r"test_(corrupt_checkpoint_files|failed_save_overwrites_nothing)"),
]


def _optimizer(param_id: str, names: list[str]) -> str | None:
    for n in sorted(names, key=len, reverse=True):
        if param_id == n or param_id.startswith(n + "-"):
            return n
    return None


def summarize(xml_path: str, failures: bool = False) -> str:
    names = lo.available_optimizers()
    cells: dict[tuple[str, str], list[str]] = defaultdict(list)
    messages: list[str] = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        full = case.get("name", "")
        m = re.match(r"(\w+)\[(.*)\]$", full)
        if not m:
            continue
        test, pid = m.groups()
        opt = _optimizer(pid, names)
        if opt is None:
            continue
        rest = pid[len(opt):].lstrip("-")
        key = f"{test}-{rest}" if rest else test
        col = next((c for c, pat in COLUMNS if re.search(pat, key)), None)
        if col is None:
            continue
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "fail"
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            first = (node.get("message") or "").strip().splitlines()[:1]
            messages.append(f"- {opt} / {col} ({full}): {first[0][:300] if first else '?'}")
        elif case.find("skipped") is not None:
            outcome = "skip"
        else:
            outcome = "pass"
        cells[(opt, col)].append(outcome)
    header = "| optimizer | " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for n in names:
        row = []
        for c, _ in COLUMNS:
            outs = cells.get((n, c), [])
            if not outs:
                row.append("–")
            elif all(o == "skip" for o in outs):
                row.append("skip")
            elif "fail" in outs:
                row.append(f"**FAIL {outs.count('fail')}/{len(outs)}**")
            else:
                row.append("pass")
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    if failures and messages:
        lines += ["", "Failures:", *messages]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1], failures="--failures" in sys.argv))
