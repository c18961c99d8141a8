from nexttoken.cli import run

run()
