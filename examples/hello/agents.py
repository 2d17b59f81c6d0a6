"""Two small agents for the hello example. `python agents.py greeter|analyst`."""

import sys

from cadenza import Agent, FatalError, Task

greeter = Agent("greeter")
analyst = Agent("analyst")


@greeter.handler
async def greet(task: Task) -> dict:
    name = task.input.get("name")
    if not name:
        raise FatalError("input.name is required")
    task.log.info("greeting", name=name)
    return {"greeting": f"Hello, {name}!"}


@analyst.handler
def analyse(task: Task) -> dict:  # a sync handler runs in a worker thread
    text, op = task.input["text"], task.input["op"]
    if op == "shout":
        return {"text": text.upper()}
    if op == "count":
        return {"letters": sum(c.isalpha() for c in text), "words": len(text.split())}
    raise FatalError(f"unknown op {op!r}")


AGENTS = {a.name: a for a in (greeter, analyst)}

if __name__ == "__main__":
    AGENTS[sys.argv[1]].run()
