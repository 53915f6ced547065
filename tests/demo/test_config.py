"""configs/demo.yaml and the config `tfcal demo` writes are the same job."""

from pathlib import Path

from tfcal.config import config_to_dict, load_config
from tfcal.demo.run import DETECTOR_DIR, write_demo_config

REPO = Path(__file__).resolve().parents[2]


def _normalized(cfg, out: Path):
    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, str) and v.startswith("/"):
            p = Path(v).resolve()
            return str(p.relative_to(out)) if p.is_relative_to(out) else str(p)
        return v
    return fix(config_to_dict(cfg))


def test_configs_demo_yaml_equals_what_tfcal_demo_writes(tmp_path):
    written = load_config(write_demo_config(tmp_path, DETECTOR_DIR))
    committed = load_config(REPO / "configs" / "demo.yaml")
    assert _normalized(committed, (REPO / "runs" / "demo").resolve()) == \
        _normalized(written, tmp_path.resolve())
    assert committed.model.saved_model.resolve() == DETECTOR_DIR
