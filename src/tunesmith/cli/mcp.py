"""`tunesmith mcp`: serve tunesmith's tools to a coding agent over the Model Context Protocol (stdio)."""

from __future__ import annotations

from rich.console import Console


def register(sub) -> None:
    p = sub.add_parser("mcp", help="serve data check, plan, train, eval and export to an agent (MCP, stdio)",
                       description="A Model Context Protocol server on stdin/stdout. Register it with an agent as "
                                   "the command `tunesmith mcp`; see docs/mcp.md.")
    p.set_defaults(handler=run)


def run(args, console: Console) -> int:
    from ..mcp_server import serve

    serve()
    return 0
