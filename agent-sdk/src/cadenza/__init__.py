"""Cadenza agent SDK: write an agent as one decorated function.

from cadenza import Agent, Task

agent = Agent("classifier")

@agent.handler
async def classify(task: Task) -> dict:
    return {"category": "billing"}

if __name__ == "__main__":
    agent.run()   # settings from CADENZA_* environment variables
"""

from ._agent import Agent, AgentSettings
from ._context import ContextConflict
from ._errors import BudgetExceeded, FatalError, RetryableError, TaskError
from ._logging import configure_logging
from ._task import Task

__all__ = [
    "Agent",
    "AgentSettings",
    "BudgetExceeded",
    "ContextConflict",
    "FatalError",
    "RetryableError",
    "Task",
    "TaskError",
    "configure_logging",
]
__version__ = "0.1.0"
