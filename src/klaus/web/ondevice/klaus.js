var t=()=>Promise.reject(new Error("klaus.js: the model API is not built yet")),o=t,e=t,s=t,r=t;export{e as classify,o as load,s as runTensor,r as weightDigests};
