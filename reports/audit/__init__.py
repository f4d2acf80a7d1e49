"""Audits at scale: ``xmllm run CONFIG.yaml`` runs explainers, hallucination checks and faithfulness metrics
over a whole sample set, one folder per sample written atomically (a killed run resumes where it
stopped), locally or on Ray, and writes a self-contained summary and a site section.

Modules: :mod:`.config` (the YAML, validated), :mod:`.sources` (sample sets), :mod:`.worker`
(one sample), :mod:`.checks` (hallucination checks), :mod:`.executor` (local, Ray),
:mod:`.store` (the output folder), :mod:`.run` (the loop), :mod:`.summary` and :mod:`.site`.
"""
from __future__ import annotations

from .config import AuditConfig, ConfigError, load_config
from xmllm.audit.driver import AuditOutcome, run_audit

__all__ = ["AuditConfig", "AuditOutcome", "ConfigError", "load_config", "run_audit"]
