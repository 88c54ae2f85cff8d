"""Preference data: the in-memory pair layout, the on-disk log format and dataset loaders."""

from mrm.data.pairs import PreferenceData, TextTable, UserPairs

__all__ = ["PreferenceData", "TextTable", "UserPairs"]
