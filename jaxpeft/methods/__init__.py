"""PEFT methods: one frozen config dataclass and pure init/merge/unmerge functions per method."""
