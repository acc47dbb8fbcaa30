"""A small Flask app served end to end."""

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/")
def index():
    return "Hello from Flask"


@app.post("/json")
def json_increment():
    return jsonify(n=request.get_json()["n"] + 1)


@app.post("/form")
def form():
    return f"{request.form['name']} is a {request.form['kind']}"


@app.get("/boom")
def boom():
    return 1 / 0
