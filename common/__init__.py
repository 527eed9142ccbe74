"""Pure building blocks shared by master and slave: envelope, codecs, topics, keys, chunking.

Nothing in here sleeps, spawns threads or talks to the network, except `transport`,
which is the one adapter to paho-mqtt.
"""
