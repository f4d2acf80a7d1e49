"""Jinja2 templates for xmllm's reports and site pages, shipped as package data."""
from pathlib import Path

TEMPLATE_DIR: Path = Path(__file__).resolve().parent
