"""README.md stays in step with the code (issue 6 point 1): the env-var table is the generated one, every setting is
documented, and the two quick-start commands are there verbatim."""
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
