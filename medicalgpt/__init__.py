import medicalgpt.quiet  # noqa: F401  (filters known library messages; see its docstring)
