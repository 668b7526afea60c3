"""What a person reads about jobs: summaries from the invocation log (summary), the table
style every command prints with (tables), figures (plots), the machine a run was on
(machine) and `report --out`'s report.md (jobreport).
"""
