"""README.md stays in step with the code (issue 6 point 1): the env-var table is the generated one, every setting is
documented, the two quick-start commands are there verbatim, and every error has a troubleshooting row."""
import re

import train_gpt as T
from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
START, END = "<!-- env-table:start -->", "<!-- env-table:end -->"
QUICK_START = [
    "pip install -r requirements.txt && python prepare_caseops_data.py --demo && "
    "RUN_PRESET=demo torchrun --standalone --nproc_per_node=1 train_gpt.py",
    "bash .ci/run",
    # the CPU-only form of the first command
    "pip install -r requirements.txt && python prepare_caseops_data.py --demo && RUN_PRESET=tiny python train_gpt.py",
]


def code_block_lines():
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", README, flags=re.S | re.M)
    return {line.strip() for b in blocks for line in b.splitlines()}


def test_env_table_is_generated_from_config():
    assert README.count(START) == 1 and README.count(END) == 1
    table = README.split(START, 1)[1].split(END, 1)[0].strip("\n")
    assert table == T.env_table(), "README env table is stale: paste the output of `python train_gpt.py env-table`"


def test_every_setting_is_documented():
    missing = [n for n, _, _ in T.CONFIG if f"`{n}`" not in README]
    assert not missing, f"settings missing from README: {missing}"
    for preset in T.PRESETS:
        assert f"`{preset}`" in README


def test_quick_start_commands_verbatim_in_code_blocks():
    lines = code_block_lines()
    for cmd in QUICK_START:
        assert cmd in lines, f"quick-start command not found verbatim in a README code block: {cmd}"
    # the files and modes the commands rely on exist
    assert (ROOT / ".ci" / "run").is_file() and (ROOT / "requirements.txt").is_file()
    assert T.PRESETS["demo"]["DATA_PATH"] == T.PRESETS["tiny"]["DATA_PATH"] == "./data/demo"
    import prepare_caseops_data as prep
    assert str(prep.DEFAULT_DEMO_DIR) == "data/demo"


def test_every_error_has_a_troubleshooting_row():
    """Each `error:` message of train_gpt.py and each DataError / LayoutError of prepare_caseops_data.py has a row in
    the README's Troubleshooting section: some run of up to three consecutive words of the message's fixed text
    (between its {placeholders}) appears in one row."""
    section = README[README.index("## Troubleshooting"):]
    section = section[:section.index("\n## ", 1)]
    norm = lambda t: re.findall(r"[a-z0-9_\-]+", t.lower())
    rows = [" ".join(norm(r)) for r in section.splitlines() if r.startswith("|")]
    patterns = {"train_gpt.py": r'SystemExit\(f?"error: ((?:[^"\\]|\\.)*)"',
                "prepare_caseops_data.py": r'(?:DataError|LayoutError)\(f?"((?:[^"\\]|\\.)*)"'}
    missing, seen = [], 0
    for name, pat in patterns.items():
        for m in re.finditer(pat, (ROOT / name).read_text(encoding="utf-8")):
            seen += 1
            pieces = [norm(p) for p in re.split(r"\{[^}]*\}", m.group(1).replace("\\", ""))]
            runs = {" ".join(w[i:i + min(3, len(w))]) for w in pieces if len(w) >= 2 for i in range(len(w) - min(3, len(w)) + 1)}
            if not any(r in row for r in runs for row in rows):
                missing.append(f"{name}: {m.group(1)[:80]}")
    assert seen > 40, "the error patterns found too few messages: the test would be vacuous"
    assert not missing, "errors without a README troubleshooting row:\n" + "\n".join(missing)
