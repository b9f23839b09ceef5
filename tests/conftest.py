"""Shared test setup: the data directory beside the checkout, an offline hub, and the repo root."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault('AGENT_DISTILLATION_DATA', str((ROOT.parent/'shared'/'data').resolve()))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
