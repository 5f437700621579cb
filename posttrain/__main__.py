from posttrain.cli import app

app(prog_name="posttrain")
