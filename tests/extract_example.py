#!/usr/bin/env python3
"""Writes the code block that follows `<!-- example: NAME -->` in a Markdown file to OUTPUT,
so that the README's examples are compiled and run as tests rather than trusted."""
import sys

readme, name, output = sys.argv[1:4]
lines = open(readme, encoding="utf-8").read().split("\n")
marker = f"<!-- example: {name} -->"
start = lines.index(marker) + 1
if not lines[start].startswith("```"):
    sys.exit(f"{readme}: the line after '{marker}' must open a code block")
end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
with open(output, "w", encoding="utf-8") as out:
    out.write(f"// Generated from {readme} ({marker}); edit the README, not this file.\n")
    out.write("\n".join(lines[start + 1:end]) + "\n")
