"""The consumers: one per notification type, plus merchant event delivery."""
