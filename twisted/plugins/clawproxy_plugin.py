from twisted.application.service import ServiceMaker

clawproxy = ServiceMaker("clawproxy", "clawproxy.tap", "LLM and agent gateway", "clawproxy")
