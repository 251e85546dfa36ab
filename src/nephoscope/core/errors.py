"""The one error hierarchy: every message says what went wrong and what to do next."""

from __future__ import annotations


class NephoscopeError(Exception):
    """Root of every error nephoscope raises on purpose."""


class LabError(NephoscopeError):
    """Building, starting or stopping a lab guest failed."""


class ProfileError(LabError):
    """A lab profile is missing or malformed."""


class ConnectorError(NephoscopeError):
    """Talking to a hypervisor (QMP, shared RAM, gdbstub, dump file) failed."""


class MemoryAccessError(NephoscopeError):
    """A guest-physical read fell outside RAM or could not be served."""


class TranslationError(MemoryAccessError):
    """A guest-virtual address has no present mapping (or the page tables are corrupt)."""


class GuestDataError(NephoscopeError):
    """Guest-controlled data was malformed, cyclic, truncated or absurd."""


class DetectionError(NephoscopeError):
    """The guest kernel could not be identified; the message names the stage that failed."""


class KnowledgeError(NephoscopeError):
    """The knowledge base (code pages, vulnerabilities, rules) could not be read or updated."""
