# The demo's instructions (scripts/demo prints them to stderr before it runs the appliance).
# demo_instructions MQTT_PORT HTTP_PORT
demo_instructions() {
  local PORT="$1" HTTP_PORT="$2"
cat <<TXT

The appliance is starting (models load in a few seconds). In another terminal:

  # ask (plain text or JSON), and read the answers
  mosquitto_sub -p $PORT -t 'appliance/response/#' -t 'appliance/stream/#' -v &
  mosquitto_pub -p $PORT -t appliance/request/chat -m 'Write a haiku about a gallery at night.'
  mosquitto_pub -p $PORT -t appliance/request/chat \\
    -m '{"id": "a1", "prompt": "Name three colours.", "stream": true, "max_tokens": 40}'

  # an image for the display "main" (the demo has no image model: the reply says how to add one)
  mosquitto_pub -p $PORT -t appliance/request/image -m 'a lighthouse in a storm at night'

  # what the appliance says about itself
  mosquitto_sub -p $PORT -t 'appliance/status' -t 'appliance/info' -t 'appliance/state' -v

  # the operator's console (state, cards, queue, charts, a prompt box) and the display page
  #   open http://127.0.0.1:$HTTP_PORT/ and http://127.0.0.1:$HTTP_PORT/display/main in a browser

  # the OpenAI-compatible API (any OpenAI client: base_url http://127.0.0.1:$HTTP_PORT/v1)
  curl -s http://127.0.0.1:$HTTP_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 30}'
  curl -s http://127.0.0.1:$HTTP_PORT/health

  # or one completion without MQTT
  .venv/bin/appliance chat --model models/smollm2-135m-instruct "Hello!"

TXT
}
