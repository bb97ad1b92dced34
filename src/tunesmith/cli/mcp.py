"""`tunesmith mcp`: serve tunesmith's tools to MCP clients over the Model Context Protocol (stdio)."""

from __future__ import annotations

from rich.console import Console


def register(sub) -> None:
    p = sub.add_parser("mcp", help="serve data check, plan, train, eval and export to an MCP client (stdio)",
                       description="A Model Context Protocol server on stdin/stdout. Register it with an MCP client as "
                                   "the command `tunesmith mcp`; see docs/mcp.md.")
    p.set_defaults(handler=run)


def run(args, console: Console) -> int:
    from ..api import serve_mcp

    serve_mcp()
    return 0
